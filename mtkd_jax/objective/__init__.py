"""The distillation objective: from teacher logits to what the student learns from and the
batch loss.

* `targets`: fused and leave-one-out targets (`distill_targets`: softmax at T, teacher weights
  from `mtkd_jax.weighting`, fused target);
* `loss`: the batch objective of one distillation step, whole or chunked over a sequence.
"""

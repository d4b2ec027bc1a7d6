"""The engine: train state, batches, step factories, evaluation, the fit loop, checkpoints.

* `state`: `TrainState` (one model or K stacked) and its initialisers;
* `batch`: what a batch holds (`check_batch`, `batch_parts`);
* `steps`: supervised, distill and codistill step factories (un-jitted);
* `evaluation`: the eval step and `evaluate`;
* `fit`: the kill-safe training loop (with its insides `fit.run` and `fit.tracking`);
* `checkpoint`: orbax checkpoints of the train state.
"""

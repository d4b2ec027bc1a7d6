"""The language-model distillation step as a hand-written PyTorch CPU loop, run as a worker
process by `benchmarks/lm.py` (torch comes from the `bench` extra and is imported only here,
only in the worker).

The same workload as `bare_lm.py`, written the way a PyTorch user would: the same Llama-style
decoder over a dict of tensors loaded from the JAX params (`Transformer`'s layout; the tied
head is the embedding transposed), teachers under `torch.no_grad()`, the whole `[K, B, L, V]`
soft loss, `torch.optim.AdamW` (the same update as `optax.adamw`). Two variants, each with its
own copy of the initial student and optimizer: ``eager`` and ``compiled`` (`torch.compile` of
the forward and loss; backward and the optimizer step as usual).

Protocol (one line per command on stdin, one JSON line per answer on stdout):
``first <mode>`` -> {"loss": the first step's loss}; ``run <mode> <n>`` -> {"seconds": time of
n steps}; ``quit``. Start: ``python torch_lm.py <setup.npz>``; the first answer is
{"ready": true, "torch": version, "threads": n}.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _model(torch, F):
    def rms(x, scale, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale

    def rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def logits(p, tokens):
        b, length = tokens.shape
        emb = p["embed/embedding"]
        h = emb[tokens]
        depth = sum(1 for k in p if k.endswith("attn_norm/scale"))
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        for i in range(depth):
            pre = f"layers/{i}/"
            x = rms(h, p[pre + "attn_norm/scale"])
            q = torch.einsum("ble,ehd->blhd", x, p[pre + "attn/q/kernel"])
            k = torch.einsum("ble,egd->blgd", x, p[pre + "attn/k/kernel"])
            v = torch.einsum("ble,egd->blgd", x, p[pre + "attn/v/kernel"])
            heads, d, g = q.shape[2], q.shape[3], k.shape[2]
            inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
            ang = torch.arange(length, dtype=torch.float32)[:, None] * inv.float()
            cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            q = q.reshape(b, length, g, heads // g, d)
            s = torch.einsum("bqgrd,bkgd->bgrqk", q, k) * d**-0.5
            s = s.masked_fill(~causal, torch.finfo(torch.float32).min)
            o = torch.einsum("bgrqk,bkgd->bqgrd", s.softmax(-1), v).reshape(b, length, heads, d)
            h = h + torch.einsum("blhd,hde->ble", o, p[pre + "attn/o/kernel"])
            x = rms(h, p[pre + "mlp_norm/scale"])
            m = F.silu(x @ p[pre + "mlp/gate/kernel"]) * (x @ p[pre + "mlp/up/kernel"])
            h = h + m @ p[pre + "mlp/down/kernel"]
        return rms(h, p["norm/scale"]) @ emb.T

    return logits


def _setup(path: str):
    import torch
    from torch.nn import functional as F

    data = np.load(path)
    cfg = json.loads(str(data["config"]))
    t, alpha = cfg["temperature"], cfg["alpha"]
    groups: dict[str, dict] = {}
    for key in data.files:
        if key == "config" or key.startswith("batch"):
            continue
        who, name = key.split("|", 1)
        groups.setdefault(who, {})[name] = data[key]
    teachers = [{n: torch.from_numpy(a) for n, a in groups[f"teacher{i}"].items()}
                for i in range(cfg["teachers"])]
    batches = [tuple(torch.from_numpy(data[f"batch{i}_{f}"]) for f in ("x", "y", "mask"))
               for i in range(cfg["batches"])]
    batches = [(x.long(), y.long(), m) for x, y, m in batches]
    logits = _model(torch, F)

    def loss_of(student, tokens, labels, mask):
        with torch.no_grad():
            z = torch.stack([logits(tp, tokens) for tp in teachers])
            probs = (z / t).softmax(-1)
            target = probs.mean(0)
            count = mask.sum()
            sq = (probs[:, None] - probs[None, :]).square().sum(-1)
            divergence = (sq * mask).sum((2, 3)) / count  # noqa: F841 (the same work)
        s = logits(student, tokens)
        log_q = F.log_softmax(s / t, dim=-1)
        kl = (target * (target.clamp_min(1e-38).log() - log_q)).sum(-1)
        ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction="none")
        soft = t * t * (kl * mask).sum() / count
        hard = (ce * mask.flatten()).sum() / count
        return (1.0 - alpha) * soft + alpha * hard

    def variant(compiled: bool):
        student = {n: torch.from_numpy(a.copy()).requires_grad_(True)
                   for n, a in groups["student"].items()}
        opt = torch.optim.AdamW(list(student.values()), lr=cfg["lr"],
                                weight_decay=cfg["weight_decay"], eps=1e-8)
        fn = torch.compile(loss_of) if compiled else loss_of
        state = {"i": 0}

        def step():
            tokens, labels, mask = batches[state["i"] % len(batches)]
            state["i"] += 1
            opt.zero_grad(set_to_none=True)
            loss = fn(student, tokens, labels, mask)
            loss.backward()
            opt.step()
            return float(loss.detach())

        return step

    return torch, variant


def main(path: str) -> None:
    torch, variant = _setup(path)
    steps: dict = {}  # built when first asked for: `torch.compile` alone imports for seconds
    out = sys.stdout

    def say(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    say({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        try:
            if cmd[0] == "first":
                if cmd[1] not in ("eager", "compiled"):
                    raise ValueError(f"mode must be 'eager' or 'compiled', got {cmd[1]!r}")
                steps[cmd[1]] = variant(cmd[1] == "compiled")
                say({"loss": steps[cmd[1]]()})
            elif cmd[0] == "run":
                n = int(cmd[2])
                t0 = time.perf_counter()
                for _ in range(n):
                    steps[cmd[1]]()
                say({"seconds": time.perf_counter() - t0})
            else:
                say({"error": f"unknown command {cmd[0]!r}"})
        except Exception as e:  # reported to the parent, which records it
            say({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main(sys.argv[1])

"""The benchmark's distillation step as a plain PyTorch loop (CPU): the comparison a user
would make themselves. Optional: `available()` is False without torch.

The modules load the Flax parameters of `mtkd_jax.models.ConvNet` / `SmallConvNet`
(HWIO kernels -> OIHW), so the first loss can be checked against the JAX steps.
"""

from __future__ import annotations

import numpy as np


def available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _modules():
    import torch
    from torch import nn
    from torch.nn import functional as F

    def load_conv(conv: nn.Conv2d, p) -> None:
        conv.weight.data = torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
        conv.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())

    def load_dense(dense: nn.Linear, p) -> None:
        dense.weight.data = torch.from_numpy(np.asarray(p["kernel"]).T.copy())
        dense.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())

    class ConvNet(nn.Module):
        def __init__(self, params, in_ch: int):
            super().__init__()
            shapes = [np.shape(params[f"Conv_{i}"]["kernel"]) for i in range(4)]
            self.convs = nn.ModuleList(nn.Conv2d(s[2], s[3], 3, padding=1) for s in shapes)
            for i, conv in enumerate(self.convs):
                load_conv(conv, params[f"Conv_{i}"])
            d = np.shape(params["Dense_0"]["kernel"])
            self.dense = nn.Linear(d[0], d[1])
            load_dense(self.dense, params["Dense_0"])

        def forward(self, x):
            c = self.convs
            x = F.relu(c[0](x))
            x = F.max_pool2d(F.relu(c[1](x)), 2)
            x = F.max_pool2d(F.relu(c[2](x)), 2)
            x = F.relu(c[3](x))
            return self.dense(x.mean(dim=(2, 3)))

    class SmallConvNet(nn.Module):
        def __init__(self, params):
            super().__init__()
            shapes = [np.shape(params[f"Conv_{i}"]["kernel"]) for i in range(2)]
            self.convs = nn.ModuleList(nn.Conv2d(s[2], s[3], 3, padding=1) for s in shapes)
            for i, conv in enumerate(self.convs):
                load_conv(conv, params[f"Conv_{i}"])
            d = np.shape(params["Dense_0"]["kernel"])
            self.dense = nn.Linear(d[0], d[1])
            load_dense(self.dense, params["Dense_0"])

        def forward(self, x):
            for conv in self.convs:
                x = F.max_pool2d(F.relu(conv(x)), 2)
            return self.dense(x.mean(dim=(2, 3)))

    return torch, F, ConvNet, SmallConvNet


def make_step(teacher_params_list, student_params, *, temperature, alpha, lr, momentum):
    """`(step(x, y) -> loss tensor, to_input(x_nhwc, y) -> (x, y))` over torch modules."""
    torch, F, ConvNet, SmallConvNet = _modules()
    teachers = [ConvNet(p, 3).eval() for p in teacher_params_list]
    for t in teachers:
        t.requires_grad_(False)
    student = SmallConvNet(student_params)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum)
    t_ = temperature

    def step(x, y):
        with torch.no_grad():
            z = torch.stack([t(x) for t in teachers])  # [K, B, C]
            k = z.shape[0]
            probs = F.softmax(z / t_, dim=-1)
            divergence = (probs[:, None] - probs[None, :]).square().sum(-1).mean(-1)  # noqa: F841
            ce_t = -F.log_softmax(z, dim=-1).gather(-1, y[None, :, None].expand(k, -1, 1))[..., 0]
            w = (1.0 - F.softmax(ce_t, dim=0)) / (k - 1)
            target = (w[..., None] * probs).sum(0)
        opt.zero_grad(set_to_none=True)
        s = student(x)
        log_q = F.log_softmax(s / t_, dim=-1)
        kl = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-38)) - log_q), 0.0)
        ce = F.cross_entropy(s, y, reduction="none")
        loss = ((1.0 - alpha) * t_ * t_ * kl.sum(-1) + alpha * ce).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    def to_input(x_nhwc, y):
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)))
        return x, torch.from_numpy(np.asarray(y).astype(np.int64))

    return step, to_input


def versions() -> dict:
    import torch

    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}

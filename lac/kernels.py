"""Which kernel runs the model's Linears on the CPU: torch's own (MKL) or oneDNN's.

torch's float32 Linear calls MKL's sgemm there. Its small-row kernel is slow (a
12-row decode step of the 151,936-entry head reads its weight at ~5 GB/s, a
third of the FLOP rate of a 360-row call), and a row's bits depend on how many
rows share the call. oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, on
the plain weight: nothing is copied or packed) gives each row the same bits
whatever the batch and thread count, and ran the embedded Qwen's shapes 1.1-2.6x
faster, most at few rows (README "Speed"). Its numbers differ from MKL's by float32 rounding.

`model.linear`: auto (oneDNN for float32 on x86-64 CPUs where torch has it,
else torch), onednn (required: an error where it cannot run), torch (HF's own).
"""

from __future__ import annotations

import platform

import torch
from torch import nn

from lac.errors import LacError

CHOICES = ("auto", "onednn", "torch")


class OneDNNLinear(nn.Linear):
    """An nn.Linear (same weight, bias, hooks and state dict) whose float32 CPU forward is oneDNN's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return super().forward(x)  # oneDNN's op has no backward
        if x.numel() == x.shape[-1]:  # one row takes another kernel (other bits): run it as two
            two = x.reshape(1, -1).expand(2, -1).contiguous()
            return _onednn(two, self.weight, self.bias)[:1].reshape(*x.shape[:-1], -1)
        return _onednn(x, self.weight, self.bias)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_missing(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why oneDNN cannot run this model's Linears (None: it can)."""
    if device.type != "cpu":
        return f"the model runs on {device.type}, oneDNN's Linear here is CPU-only"
    if dtype != torch.float32:
        return f"the model runs in {str(dtype).replace('torch.', '')}, oneDNN's Linear is used for float32 only"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, lac uses oneDNN on x86-64 only (measured there)"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return f"torch {torch.__version__} was built without oneDNN's linear op"
    return None


def check_choice(choice: object) -> str:
    """The configured `model.linear`, refused before any work when it is not one lac knows."""
    if choice not in CHOICES:
        raise LacError(f"model.linear={choice!r}; allowed: {', '.join(CHOICES)} "
                       "(auto: oneDNN for float32 on x86-64 CPUs, else torch's own Linear)")
    return str(choice)


def resolve(choice: str, dtype: torch.dtype, device: torch.device) -> str:
    """The kernel a job runs: 'onednn' or 'torch'."""
    if check_choice(choice) == "torch":
        return "torch"
    why = onednn_missing(dtype, device)
    if why and choice == "onednn":
        raise LacError(f"model.linear=onednn cannot run: {why}; use model.linear=auto or torch")
    return "torch" if why else "onednn"


def use_onednn(model: nn.Module) -> int:
    """Turn every plain float32 CPU nn.Linear of `model` into a OneDNNLinear, after checking one of them
    against torch's own forward (a broken build fails here, not in a job's numbers). Returns how many."""
    linears = [m for m in model.modules()
               if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    if linears:
        probe = linears[0]
        x = torch.randn(3, probe.in_features, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            want = probe(x)
            got = _onednn(x, probe.weight, probe.bias)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item())):
            raise LacError(f"oneDNN's Linear disagrees with torch's (max |diff| {(got - want).abs().max():.3g}); "
                           "use model.linear=torch")
    for m in linears:
        m.__class__ = OneDNNLinear
    return len(linears)

"""Tensors that meet across devices: clean captures live on the CPU, the model's outputs on its device.

A CUDA run is the real check (`LAC_TEST_DEVICE=cuda` puts the tiny models of tests/tiny.py on the GPU);
without one, the `meta` device stands in: any op mixing it with a CPU tensor raises, as CUDA does.
"""

from __future__ import annotations

import torch

from lac.metrics import kl_window, kl_window_tensor


def test_kl_window_takes_clean_log_probs_from_the_cpu_to_the_intervened_device():
    clean = torch.randn(3, 11).log_softmax(-1)
    patched = torch.empty(3, 11, device="meta")
    with_meta = kl_window_tensor(clean, patched)  # before the fix: "not on the expected device"
    assert with_meta.device.type == "meta"
    other = torch.randn(3, 11).log_softmax(-1)
    want = float((clean.exp() * (clean - other)).sum())
    assert kl_window(clean, other) == want
    assert kl_window(clean, clean) == 0.0

"""Tensors that meet across devices: clean captures live on the CPU, the model's outputs on its device.

A CUDA run is the real check (`LAC_TEST_DEVICE=cuda` puts the tiny models of tests/tiny.py on the GPU);
without one, the `meta` device stands in: any op mixing it with a CPU tensor raises, as CUDA does.
"""

from __future__ import annotations

import torch

from lac.metrics import WindowKL, kl_window, kl_window_tensor


def test_kl_window_takes_clean_log_probs_from_the_cpu_to_the_intervened_device():
    clean = torch.randn(3, 11).log_softmax(-1)
    patched = torch.empty(3, 11, device="meta")
    with_meta = kl_window_tensor(clean, patched)  # before the fix: "not on the expected device"
    assert with_meta.device.type == "meta"
    other = torch.randn(3, 11).log_softmax(-1)
    want = float((clean.exp() * (clean - other)).sum())
    assert kl_window(clean, other) == want
    assert kl_window(clean, clean) == 0.0


def test_window_kl_reusing_its_buffers_has_kl_windows_bits():
    """kl_rows computes every row's KL in buffers kept across rows; no value may change by a bit, whatever
    came before in the buffers (another window, another shape)."""
    g = torch.Generator().manual_seed(0)
    kl = WindowKL()
    for rows, vocab in ((10, 4099), (10, 4099), (3, 11), (10, 4099)):
        clean = torch.randn(rows, vocab, generator=g).log_softmax(-1)
        for scale in (1e-4, 1e-2, 1.0):  # small KLs are where any reordering would show
            other = (clean + scale * torch.randn(rows, vocab, generator=g)).log_softmax(-1)
            want = kl_window(clean, other)
            assert want == float((clean.exp() * (clean - other)).sum())
            assert kl(list(clean), list(other)) == want
        assert kl(list(clean), list(clean)) == 0.0

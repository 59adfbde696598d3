"""oneDNN's Linear (lac.kernels): the same rows whatever the batch, the model's numbers, the config's checks.

The engine's agreement with plain forwards under either kernel is in tests/test_engine.py (`linear`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lac import kernels
from lac.errors import LacError
from tests.conftest import compose
from tests.tiny import LINEARS, tiny_model

needs_onednn = pytest.mark.skipif("onednn" not in LINEARS, reason="torch here has no oneDNN linear op")


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(n_in, n_out, bias=bias).requires_grad_(False)
    kernels.use_onednn(lin)
    assert type(lin) is kernels.OneDNNLinear
    return lin


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_a_row_has_the_same_bits_in_any_batch_and_at_any_thread_count(bias):
    """What MKL's sgemm does not promise: a row's output independent of the rows beside it."""
    lin = _linear(96, 300, bias)
    x = torch.randn(70, 96, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([lin(x[i : i + 1]) for i in range(len(x))])
        torch.set_num_threads(2)
        for size in (2, 5, 12, 33, 70):
            for i in range(0, len(x), size):
                assert torch.equal(lin(x[i : i + size]), alone[i : i + size]), (size, i)
        assert torch.equal(lin(x.reshape(7, 10, 96)), alone.reshape(7, 10, 300))  # [batch, seq, d] as in a block
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(alone, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_gradients_fall_back_to_torchs_linear():
    lin = _linear(16, 8, True).requires_grad_(True)
    x = torch.randn(4, 16, requires_grad=True)
    lin(x).square().sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


@needs_onednn
@pytest.mark.parametrize("arch", ["gemma2", "qwen2", "llama"])
def test_converted_model_keeps_weights_hooks_and_numbers(arch, monkeypatch):
    plain, fast = tiny_model(arch), tiny_model(arch, linear="onednn")
    n_linear = sum(type(m) is nn.Linear for m in plain.model.modules())
    assert n_linear > 0 and sum(type(m) is kernels.OneDNNLinear for m in fast.model.modules()) == n_linear
    assert fast.linear == "onednn" and plain.linear == "torch"
    assert plain.model.state_dict().keys() == fast.model.state_dict().keys()
    calls, real = [], torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    seen = []
    fast.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    ids = torch.tensor([[5, 9, 17, 3, 44, 60, 2, 8]])
    with torch.inference_mode():
        want = torch.log_softmax(plain.model(ids).logits.float(), -1)
        got = torch.log_softmax(fast.model(ids).logits.float(), -1)
    assert len(calls) == n_linear and seen == [torch.Size([1, 8, 64])]  # every Linear ran oneDNN; hooks fire
    kl = (want.exp() * (want - got)).sum(-1)
    assert kl.abs().max() < 1e-9
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_broken_onednn_is_refused_at_load(monkeypatch):
    lin = nn.Linear(8, 4)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, b, *a: F.linear(x, w, b) + 1)
    with pytest.raises(LacError, match="disagrees with torch's"):
        kernels.use_onednn(lin)
    assert type(lin) is nn.Linear  # nothing converted


def test_resolve_picks_onednn_only_where_it_runs():
    cpu, f32 = torch.device("cpu"), torch.float32
    assert kernels.resolve("torch", f32, cpu) == "torch"
    assert kernels.resolve("auto", torch.bfloat16, cpu) == "torch"
    assert kernels.resolve("auto", f32, torch.device("cuda")) == "torch"
    assert kernels.resolve("auto", f32, cpu) == ("onednn" if "onednn" in LINEARS else "torch")
    with pytest.raises(LacError, match="bfloat16"):
        kernels.resolve("onednn", torch.bfloat16, cpu)


@pytest.mark.parametrize("bad", ["mkl", "ONEDNN", True])
def test_a_bad_model_linear_is_refused_before_any_work(bad):
    from lac.config import build_spec

    cfg = compose(["tracker=none"])
    cfg.model.linear = bad
    with pytest.raises(LacError, match=r"model\.linear=.*allowed: auto, onednn, torch"):
        build_spec(cfg)


def test_the_kernel_enters_job_and_capture_keys():
    """Results and cached captures made with one kernel are never returned for the other."""
    from lac.cache import capture_key
    from lac.config import build_spec, job_key

    assert job_key(compose(["tracker=none", "model.linear=torch"])) != job_key(compose(["tracker=none"]))
    grid = build_spec(compose(["tracker=none"])).grid
    lm = tiny_model("qwen2")
    before = capture_key(lm, grid)
    lm.linear = "onednn"
    assert capture_key(lm, grid) != before


@needs_onednn
@pytest.mark.parametrize("arch", ["gemma2", "qwen2"])
def test_equally_long_prompts_give_the_same_bits_alone_or_batched(arch):
    """With every Linear row-invariant, an unpadded batch changes no prompt's numbers."""
    from lac.engine import Row, run_rows

    lm = tiny_model(arch, linear="onednn")
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 97, (9,), generator=g).tolist() for _ in range(4)]
    batched = run_rows(lm, [Row(s) for s in seqs], capture=True, logp_at=[range(9)] * 4)
    for s, b in zip(seqs, batched, strict=True):
        alone = run_rows(lm, [Row(s)], capture=True, logp_at=[range(9)])[0]
        assert torch.equal(alone.hidden, b.hidden)
        assert all(torch.equal(alone.logp[j], b.logp[j]) for j in range(9))

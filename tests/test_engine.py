"""The engine against plain HF forwards, on tiny random Gemma-2 (sliding window, softcaps), Qwen2, Llama."""

from __future__ import annotations

import json

import pytest
import torch

from lac.engine import COUNTS, Row, cache_kwarg, check_finite, decode, greedy, run_rows
from lac.models import check_head
from tests.tiny import LINEARS, tiny_model

ARCHS = ["gemma2", "qwen2", "llama"]


def _seqs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (k,), generator=g).tolist() for k in lengths]


def _plain(lm, ids, patches=()):
    """One unpadded forward; patches = [(layer, position, vector)] written by pre-hooks."""
    handles = []
    for layer, pos, vec in patches:
        def hook(module, args, kwargs, pos=pos, vec=vec):
            h = args[0].clone()
            h[0, pos] = vec
            return (h, *args[1:]), kwargs
        handles.append(lm.layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = lm.model(torch.tensor([ids], device=lm.device), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_L_is_block_L_input(arch):
    lm = tiny_model(arch)
    ids = _seqs([11])[0]
    seen = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(i, a[0].clone()), with_kwargs=True)
        for i, layer in enumerate(lm.layers)
    ]
    with torch.no_grad():
        out = lm.model(torch.tensor([ids], device=lm.device), output_hidden_states=True)
    for h in handles:
        h.remove()
    assert len(out.hidden_states) == lm.n_layers + 1
    for L in range(lm.n_layers):
        assert torch.equal(out.hidden_states[L], seen[L]), f"hidden_states[{L}] != input of block {L}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("linear", LINEARS)
def test_batched_padded_capture_equals_single_prompt(arch, linear):
    lm = tiny_model(arch, linear=linear)
    seqs = _seqs([13, 7, 10])  # longer than the tiny Gemma-2 sliding window (6)
    traces = run_rows(lm, [Row(s) for s in seqs], capture=True, keep_kv=True, logp_at=[[len(s) - 1] for s in seqs])
    for s, t in zip(seqs, traces, strict=True):
        out = _plain(lm, s)
        ref = torch.stack(out.hidden_states[: lm.n_layers])[:, 0]
        assert t.first == 0 and t.ids == s
        torch.testing.assert_close(t.hidden, ref, atol=1e-5, rtol=1e-5)
        lp = torch.log_softmax(out.logits[0, -1].float(), -1)
        torch.testing.assert_close(t.logp[len(s) - 1], lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("start_layer", [0, 2])
@pytest.mark.parametrize("linear", LINEARS)
def test_prefix_reuse_with_patches_equals_plain(arch, start_layer, linear):
    """Rows continue differently long clean prefixes, each with its own multi-layer patches."""
    lm = tiny_model(arch, linear=linear)
    seqs = _seqs([15, 11, 19])
    clean = run_rows(lm, [Row(s) for s in seqs], capture=True, keep_kv=True)
    g = torch.Generator().manual_seed(3)
    rows, plain_patches = [], []
    for i, (s, t) in enumerate(zip(seqs, clean, strict=True)):
        q = len(s) - 6 - i  # a different site position per row
        layers = [2] if i == 0 else [2, 3]
        vecs = [torch.randn(64, generator=g) for _ in layers]
        rows.append(Row(s[q : q + 5], prefix=t, start=q, patches=[(L, 0, v) for L, v in zip(layers, vecs, strict=True)]))
        plain_patches.append([(L, q, v) for L, v in zip(layers, vecs, strict=True)])
    out = run_rows(lm, rows, start_layer=start_layer, logp_at=[range(5)] * len(rows))
    for s, r, t, pp in zip(seqs, rows, out, plain_patches, strict=True):
        logits = _plain(lm, s[: r.start + 5], pp).logits[0].float()
        for j in range(5):
            lp = torch.log_softmax(logits[r.start + j], -1)
            torch.testing.assert_close(t.logp[r.start + j], lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("start_layer", [0, 2])
@pytest.mark.parametrize("linear", LINEARS)
def test_rows_of_different_prefix_and_new_lengths_share_a_forward(arch, start_layer, linear):
    """Right-padded new tokens after left-padded prefixes: each row equals its own plain forward."""
    lm = tiny_model(arch, seed=4, linear=linear)
    seqs = _seqs([17, 12, 20, 9], seed=8)
    clean = run_rows(lm, [Row(s) for s in seqs], capture=True, keep_kv=True)
    cuts = [(9, 17), (4, 12), (11, 14), (2, 9)]  # (start, end): prefix and new lengths all differ
    g = torch.Generator().manual_seed(6)
    rows, plain_patches = [], []
    for s, t, (a, e) in zip(seqs, clean, cuts, strict=True):
        v = torch.randn(64, generator=g)
        rows.append(Row(s[a:e], prefix=t, start=a, patches=[(3, 1, v)]))
        plain_patches.append([(3, a + 1, v)])
    out = run_rows(lm, rows, start_layer=start_layer, capture=True, keep_kv=start_layer == 0,
                   logp_at=[range(e - a) for a, e in cuts])
    for s, t, pp, (a, e) in zip(seqs, out, plain_patches, cuts, strict=True):
        res = _plain(lm, s[:e], pp)
        assert t.ids == s[:e] and t.first == a
        for j in range(e - a):
            torch.testing.assert_close(t.logp[a + j], torch.log_softmax(res.logits[0, a + j].float(), -1),
                                       atol=1e-5, rtol=1e-5)
        ref = torch.stack(res.hidden_states[start_layer: lm.n_layers])[:, 0, a:e].clone()
        ref[3 - start_layer, 1] = pp[0][2]  # hidden_states hold block 3's input before the patch
        torch.testing.assert_close(t.hidden, ref, atol=1e-5, rtol=1e-5)
        if start_layer == 0:
            assert len(t.kv) == lm.n_layers and all(k.shape[1] == e for k, _ in t.kv)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("linear", LINEARS)
def test_decode_continues_traces_like_generate(arch, linear):
    """Traces of different lengths (one built from a shared prefix) decode as `generate` would."""
    lm = tiny_model(arch, seed=2, linear=linear)
    seqs = _seqs([10, 15, 7], seed=5)
    head = run_rows(lm, [Row(seqs[1][:6])], keep_kv=True)[0]
    traces = run_rows(lm, [Row(seqs[0]), Row(seqs[1][6:], prefix=head, start=6), Row(seqs[2])], capture=True,
                      keep_kv=True, logp_at=[[9], [8], [6]])
    toks, out = decode(lm, traces, 5, capture=True, keep_logp=True)
    for s, tk, t in zip(seqs, toks, out, strict=True):
        with torch.no_grad():
            gen = lm.model.generate(torch.tensor([s]), max_new_tokens=5, do_sample=False, num_beams=1)[0, len(s):]
        n = len(gen)
        assert tk[:n] == gen.tolist()
        if n == 5:  # the decode trace equals a plain forward over prompt + tokens[:-1]
            full = s + tk[:4]
            res = _plain(lm, full)
            assert t.ids == full
            for p in range(len(s) - 1, len(full)):
                torch.testing.assert_close(t.logp[p], torch.log_softmax(res.logits[0, p].float(), -1), atol=1e-5, rtol=1e-5)
            ref = torch.stack(res.hidden_states[: lm.n_layers])[:, 0, t.first :]
            torch.testing.assert_close(t.hidden, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_goes_by_the_name_the_forward_declares(arch):
    """transformers 5.24 renamed `past_key_values` to `cache`; an undeclared name would land in
    **kwargs and the rows would attend to their new tokens alone once the old name is gone."""
    import inspect
    import warnings

    lm = tiny_model(arch, seed=2)
    base = getattr(lm.model, lm.model.base_model_prefix)
    seen: list[tuple[str, set, set]] = []  # (module, kwargs passed, parameters its forward declares)
    for mod in (lm.model, base):
        declared = set(inspect.signature(type(mod).forward).parameters) - {"kwargs"}
        name = type(mod).__name__

        def spy(*args, _inner=mod.forward, _declared=declared, _name=name, **kwargs):
            seen.append((_name, set(kwargs), _declared))
            return _inner(*args, **kwargs)

        mod.forward = spy
    seqs = _seqs([9, 6], seed=3)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            head = run_rows(lm, [Row(seqs[0][:4])], keep_kv=True)[0]
            traces = run_rows(lm, [Row(seqs[0][4:], prefix=head, start=4), Row(seqs[1])], keep_kv=True,
                              logp_at=[[4], [5]])
            decode(lm, traces, 3)
    finally:
        del lm.model.forward, base.forward
    assert len(seen) >= 4 and all(cache_kwarg() in k for _, k, _ in seen)
    assert all(k <= d for _, k, d in seen), [(n, sorted(k - d)) for n, k, d in seen]
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_head_check_refuses_unknown_logit_processing():
    lm = tiny_model("qwen2")
    lm.model.config.final_logit_softcapping = 0.5  # lac would softcap, Qwen2's forward does not
    with pytest.raises(ValueError, match="post-processes its logits"):
        check_head(lm)


def test_head_check_runs_once_per_model_config(tmp_path, monkeypatch):
    """load_model remembers a passed check_head (per class, config, versions, device) in the cache;
    a model whose config changes its logit processing is checked, and refused, again."""
    from omegaconf import OmegaConf

    import lac.models as models
    from tests.tiny import StubTokenizer

    monkeypatch.setenv("LAC_CACHE_DIR", str(tmp_path / "cache"))
    tiny_model("qwen2").model.save_pretrained(tmp_path / "m")
    cfg = OmegaConf.create({"name": "tiny", "source": "hub", "id": str(tmp_path / "m"), "dtype": "float32",
                            "device": "cpu", "attn_implementation": "eager"})
    calls = []
    real = models.check_head
    monkeypatch.setattr(models, "check_head", lambda lm: (calls.append(lm.name), real(lm)))
    models.load_model(cfg, StubTokenizer())
    models.load_model(cfg, StubTokenizer())
    assert calls == ["tiny"]
    assert len(list((tmp_path / "cache" / "checks").glob("head-*"))) == 1
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 0.5}))
    with pytest.raises(ValueError, match="post-processes its logits"):
        models.load_model(cfg, StubTokenizer())
    assert calls == ["tiny", "tiny"]


def test_start_layer_skips_lower_blocks():
    lm = tiny_model("qwen2")
    s = _seqs([12])[0]
    clean = run_rows(lm, [Row(s)], capture=True, keep_kv=True)
    before = dict(COUNTS)
    run_rows(lm, [Row(s[8:], prefix=clean[0], start=8)], start_layer=3, logp_at=[[0]])
    assert COUNTS["block_tokens"] - before["block_tokens"] == 4 * (lm.n_layers - 3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("linear", LINEARS)
def test_greedy_equals_generate_patched_and_unpatched(arch, linear):
    lm = tiny_model(arch, seed=5, linear=linear)
    seqs = _seqs([9, 14, 6], seed=7)
    vec = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 3
    patches = [[], [(1, 13, vec)], [(2, 5, vec)]]  # at each prompt's last token, prompt pass only
    toks, _ = greedy(lm, [Row(s, patches=p) for s, p in zip(seqs, patches, strict=True)], 6)
    for s, p, tk in zip(seqs, patches, toks, strict=True):
        handles = []
        for layer, pos, v in p:
            def hook(m, args, kwargs, pos=pos, v=v):
                if args[0].shape[1] == 1:  # decode steps run unpatched
                    return None
                h = args[0].clone()
                h[0, pos] = v
                return (h, *args[1:]), kwargs
            handles.append(lm.layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
        with torch.no_grad():
            gen = lm.model.generate(torch.tensor([s]), max_new_tokens=6, do_sample=False, num_beams=1)[0, len(s):].tolist()
        for h in handles:
            h.remove()
        n = len(gen)  # generate stops at EOS; greedy pads after it
        assert tk[:n] == gen
        assert all(t == lm.tokenizer.pad_token_id for t in tk[n:])


def test_patch_touches_prompt_pass_only():
    """A patch at the last prompt token changes generation, and decode steps see no write."""
    lm = tiny_model("llama", seed=3)
    s = _seqs([8], seed=4)[0]
    vec = torch.randn(64, generator=torch.Generator().manual_seed(9)) * 10
    writes = []
    lm.layers[1].register_forward_pre_hook(lambda m, a, k: writes.append(a[0].shape[1]), with_kwargs=True)
    base, _ = greedy(lm, [Row(s)], 5)
    writes.clear()
    patched, traces = greedy(lm, [Row(s, patches=[(1, 7, vec)])], 5, capture=True)
    assert writes == [8, 1, 1, 1, 1]  # one prompt pass, then single-token steps
    assert base != patched
    # the prompt pass wrote the vector; the captured block-1 input at position 7 is it
    torch.testing.assert_close(traces[0].h(1, 7).cpu(), vec)
    # decode positions were not overwritten
    assert not torch.allclose(traces[0].h(1, 8).cpu(), vec)


def test_non_finite_is_reported_with_model_and_dtype():
    lm = tiny_model("qwen2")
    with torch.no_grad():
        lm.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"tiny-qwen2.*float32"):
        run_rows(lm, [Row(_seqs([6])[0])], capture=True)
    with pytest.raises(FloatingPointError, match="non-finite"):
        check_finite(torch.tensor([1.0, float("inf")]), lm, "logits")


def test_impossible_logp_at_is_refused_naming_what_was_asked():
    """logp_at the forward cannot answer raises instead of returning no log-probs."""
    lm = tiny_model("qwen2")
    s = _seqs([9])[0]
    with pytest.raises(ValueError, match=r"depth=2 of 4 blocks"):
        run_rows(lm, [Row(s)], depth=2, logp_at=[[8]])  # the head never runs
    run_rows(lm, [Row(s)], depth=2, capture=True, logp_at=[[]])  # asking for nothing stays possible
    clean = run_rows(lm, [Row(s)], capture=True, keep_kv=True)[0]
    row = Row(s[5:], prefix=clean, start=5)  # 4 new tokens: local indices 0..3
    for bad in ([4], [-1], [0, 7]):
        with pytest.raises(ValueError, match=r"outside its 4 new tokens \(possible: 0\.\.3\)") as e:
            run_rows(lm, [row], logp_at=[bad])
        assert str([j for j in bad if not 0 <= j < 4]) in str(e.value)
    with pytest.raises(ValueError, match="index lists for 2 rows; the batch has 1"):
        run_rows(lm, [row], logp_at=[[0], [1]])
    out = run_rows(lm, [row], start_layer=2, logp_at=[[0, 3]])[0]
    assert sorted(out.logp) == [5, 8]


@pytest.mark.parametrize("arch", ARCHS)
def test_log_probs_written_in_place_are_bitwise_torch_log_softmax(arch):
    """The CPU path overwrites the head's fresh output (softcap, then log_softmax) to spare page faults:
    it must give exactly torch's out-of-place values, without a second [positions, vocab] tensor."""
    from lac.engine import log_softmax_fresh

    lm = tiny_model(arch)
    h = torch.randn(7, 64, generator=torch.Generator().manual_seed(5)).to(lm.device) * 30
    with torch.inference_mode():
        z = lm.model.get_output_embeddings()(h).float()
        cap = getattr(lm.model.config, "final_logit_softcapping", None)
        capped = torch.tanh(z / cap) * cap if cap else z
        logits = lm.logits(h)
        assert torch.equal(logits, capped)
        got = log_softmax_fresh(logits)
    assert torch.equal(got, torch.log_softmax(capped, dim=-1))
    if lm.device.type == "cpu":
        assert got.data_ptr() == logits.data_ptr()  # no second [positions, vocab] tensor


@pytest.mark.parametrize("arch", ARCHS)
def test_scratch_log_probs_have_the_same_bits_and_reuse_one_buffer(arch):
    """The KL path's log-probs go into one reused buffer (torch.mm into it instead of the head's own
    Linear): exactly the values of a plain run_rows, and a second forward writes the same memory."""
    lm = tiny_model(arch)
    rows = [Row(ids) for ids in _seqs([9, 6, 11])]
    at = [range(2, 6), range(0, 6), range(5, 11)]
    plain = run_rows(lm, rows, logp_at=at)
    first = run_rows(lm, rows, logp_at=at, scratch_logp=True)
    for p, s in zip(plain, first, strict=True):
        assert p.logp.keys() == s.logp.keys()
        for j in p.logp:
            assert torch.equal(p.logp[j], s.logp[j]), (arch, j)
    if lm.device.type != "cpu" or lm.dtype != torch.float32:
        return
    buf = lm.head_out
    assert buf is not None and first[0].logp[2].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    again = run_rows(lm, rows[:2], logp_at=at[:2], scratch_logp=True)  # fewer positions: the same buffer
    assert lm.head_out is buf and again[0].logp[2].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert torch.equal(again[1].logp[3], plain[1].logp[3])

"""Controls and mechanism interventions (METHOD.md "Beyond the paper") against plain implementations.

Plain = one prompt at a time through HF's own forward: pre-hooks that write
residuals, a pre-hook on the attention module that edits its mask (knockout),
and a hand-built past_key_values with XY's span K/V (kv_persona). Tiny random
Gemma-2 (sliding window 6, shorter than every prompt), Qwen2 and Llama, with
token-id prompts whose persona spans are known by construction.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lac.capture import capture_cells
from lac.engine import Row, cache_kwarg, greedy, run_rows
from lac.grid import Cell
from lac.interventions import Job, get_intervention, roles_needed
from lac.patching import kl_records
from lac.prompts import Prompt
from lac.sites import REF_TOKENS
from tests.tiny import tiny_model

ARCHS = ["gemma2", "qwen2", "llama"]
HEAD, SEP, TAIL = (2, 5, 6), (7, 8), (9, 10, 11)
BASE_P, BASE_T = (12, 13), (20, 21, 22)
PERSONAS = {"p1": (14, 15, 16, 17), "p2": (18,)}
TASKS = {"t1": (23, 24), "t2": (25, 26, 27)}
FILLER = (30, 31)


class Book:
    """Prompts as token ids with known spans; LY = XY with X's span replaced as METHOD says."""

    def get(self, cell, role):
        if role == "LY":
            xy = self.get(cell, "XY")
            s, e = xy.span
            repl = (BASE_P + FILLER * 4)[: e - s]
            return Prompt(xy.ids[:s] + repl + xy.ids[e:], xy.p_user_last, xy.span)
        persona = PERSONAS[cell.persona] if role[0] == "X" else BASE_P
        task = TASKS[cell.task] if role[-1] == "Y" else BASE_T
        if role == "bare":
            ids = HEAD + task + TAIL
            return Prompt(ids, len(ids) - len(TAIL) - 1)
        ids = HEAD + persona + SEP + task + TAIL
        return Prompt(ids, len(ids) - len(TAIL) - 1, (len(HEAD), len(HEAD) + len(persona)))


CELLS = [Cell("p1", "t1"), Cell("p2", "t2"), Cell("p1", "t2")]
NEW = ["host_none_lm", "host_oracle_lm", "host_oracle_norm", "host_oracle_span", "kv_persona", "knockout_persona"]


def _caps(lm, names):
    needs = roles_needed([get_intervention(n) for n in names])
    return capture_cells(lm, Book(), CELLS, roles=needs.roles, hosts=needs.hosts, trace_hosts=needs.trace_hosts,
                         span_hosts=needs.span_hosts, batch_size=2)


def assert_kl_close(got: float, want: float, what: str) -> None:
    """METHOD's numerics: rtol 1e-3 + atol 1e-6 (a flat 1e-4 would pass a patch that writes nothing)."""
    assert abs(got - want) <= 1e-6 + 1e-3 * abs(want), f"{what}: lac {got:.6g} vs plain {want:.6g}"


# --------------------------------------------------------------------------- plain implementations


def _forward(lm, ids, writes=(), knock=(), past=None, start=0):
    """Log-probs [len(ids), vocab] of one plain HF forward (eager), with residual writes
    [(layer, position, vec)] and knockouts [(layer, first, end)] of keys for queries >= end."""
    handles = []
    for layer, pos, vec in writes:
        def hook(module, args, kwargs, pos=pos - start, vec=vec):
            h = args[0].clone()
            h[0, pos] = vec
            return (h, *args[1:]), kwargs
        handles.append(lm.layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
    for layer, lo, hi in knock:
        def edit(module, args, kwargs, lo=lo, hi=hi):
            mask = kwargs["attention_mask"].clone()  # [1, 1, q, k] additive, HF eager
            q0 = start  # query i is sequence position start + i; keys are positions 0..k-1
            rows = torch.arange(mask.shape[2]) + q0 >= hi
            mask[:, :, rows, lo:hi] = float("-inf")
            return args, {**kwargs, "attention_mask": mask}
        handles.append(lm.layers[layer].self_attn.register_forward_pre_hook(edit, with_kwargs=True))
    try:
        with torch.no_grad():
            n = len(ids)
            out = lm.model(torch.tensor([ids], device=lm.device), use_cache=past is not None,
                           position_ids=torch.arange(start, start + n, device=lm.device)[None], **{cache_kwarg(): past})
    finally:
        for h in handles:
            h.remove()
    return torch.log_softmax(out.logits[0].float(), -1)


_MEMO: dict = {}  # clean plain forwards, reused across the cases of one model (keyed by the model object)


def _memo(lm, kind, ids, fn):
    key = (id(lm.model), kind, tuple(ids))
    if key not in _MEMO:
        if len(_MEMO) > 64:
            _MEMO.clear()
        _MEMO[key] = (lm.model, fn())  # keep the model alive so its id is not reused
    return _MEMO[key][1]


def _hidden(lm, ids):
    def run():
        with torch.no_grad():
            return lm.model(torch.tensor([ids], device=lm.device), output_hidden_states=True).hidden_states
    return _memo(lm, "hidden", ids, run)


def _kv(lm, ids):
    def run():
        with torch.no_grad():
            out = lm.model(torch.tensor([ids], device=lm.device), use_cache=True, **{cache_kwarg(): DynamicCache()})
            cache = getattr(out, cache_kwarg())
        return [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    return _memo(lm, "kv", ids, run)


def _ref(lm, ids):
    def run():
        with torch.no_grad():
            gen = lm.model.generate(torch.tensor([ids], device=lm.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=lm.device),
                                    max_new_tokens=REF_TOKENS, do_sample=False, num_beams=1)
        return gen[0, len(ids):].tolist()
    return _memo(lm, "ref", ids, run)


def plain_kl(lm, prompts, name, site, layers):
    """KL(P_XY || P_intervened) over the site's window, written out from METHOD.md; prompts: role -> Prompt."""
    xy, by, ly = prompts["XY"], prompts["BY"], prompts["LY"]
    ref = _ref(lm, list(xy.ids))
    w0 = {"p_last": 0, "g1": 1, "g2": 2}[site]
    tail = ref[: w0 + 10]
    pos = len(xy.ids) - 1 + w0  # the site in prompt + ref (every host here has XY's length, or BY's)
    first = len(xy.ids) - 1 + w0
    clean = _memo(lm, "clean", list(xy.ids) + tail, lambda: _forward(lm, list(xy.ids) + tail))[first : first + 10]
    hx = _hidden(lm, list(xy.ids) + tail)
    s, e = xy.span
    if name == "host_none_lm":
        lp = _forward(lm, list(ly.ids) + tail)
    elif name == "host_oracle_lm":
        lp = _forward(lm, list(ly.ids) + tail, writes=[(L, pos, hx[L][0, pos]) for L in layers])
    elif name == "host_oracle_norm":
        hb = _hidden(lm, list(by.ids) + tail)
        bpos = len(by.ids) - 1 + w0
        writes = [(L, bpos, hx[L][0, pos] * hb[L][0, bpos].norm() / hx[L][0, pos].norm()) for L in layers]
        lp = _forward(lm, list(by.ids) + tail, writes=writes)
        first = len(by.ids) - 1 + w0
    elif name == "host_oracle_span":
        lp = _forward(lm, list(ly.ids) + tail, writes=[(L, p, hx[L][0, p]) for L in layers for p in range(e, pos + 1)])
    elif name == "knockout_persona":
        lp = _forward(lm, list(xy.ids) + tail, knock=[(L, s, e) for L in layers])
    elif name == "kv_persona":
        kv_ly, kv_xy = _kv(lm, list(ly.ids)), _kv(lm, list(xy.ids))
        cache = DynamicCache()
        for L in range(lm.n_layers):
            k, v = kv_ly[L][0][:, :e].clone(), kv_ly[L][1][:, :e].clone()
            if L in layers:
                k[:, s:e], v[:, s:e] = kv_xy[L][0][:, s:e], kv_xy[L][1][:, s:e]
            cache.update(k[None], v[None], L)
        rest = _forward(lm, (list(ly.ids) + tail)[e:], past=cache, start=e)
        lp = torch.cat([torch.zeros(e, rest.shape[-1], device=rest.device), rest])
    else:
        raise ValueError(name)
    lp = lp[first : first + 10]
    return float((clean.exp() * (clean - lp)).sum())


# --------------------------------------------------------------------------- tests


# Gemma-2 (sliding window, softcaps) in the fast tier; Qwen2 and Llama with the slow tests (time)
@pytest.mark.parametrize("arch", ["gemma2", *(pytest.param(a, marks=pytest.mark.slow) for a in ("qwen2", "llama"))])
@pytest.mark.parametrize("name", NEW)
def test_each_control_equals_its_plain_implementation(arch, name):
    lm = tiny_model(arch)
    caps = _caps(lm, [name])
    # (all layers of kv_persona is the identity with clean XY: test_method_identities)
    jobs = [Job(get_intervention(name), site, layers) for site, layers in (("p_last", (1,)), ("g2", (2, 3)),
                                                                          ("p_last", (0, 2)))]
    got = kl_records(lm, caps, jobs, max_rows=7)
    assert len(got) == len(caps) * len(jobs)
    small = 0
    for cap, job, kl in got:
        layers = job.layers if get_intervention(name).writes else ()
        want = plain_kl(lm, {r: Book().get(cap.cell, r) for r in ("XY", "BY", "LY")}, name, job.site, layers)
        assert_kl_close(kl, want, f"{arch} {name} {cap.cell.key} {job.site} {job.layers}")
        small += want < 1e-4
    assert small < len(got)  # the comparison is not between zeros


@pytest.mark.parametrize("arch", ARCHS)
def test_method_identities(arch):
    lm = tiny_model(arch)
    caps = _caps(lm, ["kv_persona", "knockout_persona", "host_oracle_span", "host_none_lm"])
    all_layers = tuple(range(lm.n_layers))
    iv = get_intervention
    jobs = [Job(iv("kv_persona"), "p_last", all_layers), Job(iv("kv_persona"), "g1", all_layers),
            Job(iv("knockout_persona"), "p_last", ()), Job(iv("host_oracle_span"), "p_last", (0,)),
            Job(iv("host_none_lm"), "p_last", ())]
    got = {(c.cell.key, j.intervention.name, j.site): kl for c, j, kl in kl_records(lm, caps, jobs)}
    for c in CELLS:
        assert got[(c.key, "kv_persona", "p_last")] <= 1e-6  # all layers' span K/V from XY = clean XY
        assert got[(c.key, "kv_persona", "g1")] <= 1e-6
        assert got[(c.key, "knockout_persona", "p_last")] == 0.0  # knockout at no layer = clean
        # layer 0: embeddings of aligned post-persona tokens are equal, so writing XY's changes nothing
        assert got[(c.key, "host_oracle_span", "p_last")] == pytest.approx(got[(c.key, "host_none_lm", "p_last")],
                                                                          rel=1e-4, abs=1e-7)
        assert got[(c.key, "host_none_lm", "p_last")] > 1e-4  # LY really differs from XY


@pytest.mark.parametrize("arch", ARCHS)
def test_knockout_blocks_attention_exactly_at_its_layers(arch):
    lm = tiny_model(arch)
    caps = _caps(lm, ["knockout_persona"])
    cap = caps[0]
    xy = cap.traces["XY"]
    s, e = cap.prompts["XY"].span
    end = len(xy.ids)
    knocked = [1, 3]
    rows = [Row(xy.ids[e:end], prefix=xy, start=e, probe=(s, e)),
            Row(xy.ids[e:end], prefix=xy, start=e, probe=(s, e), knockout=[(L, s, e) for L in knocked])]
    clean, ko = run_rows(lm, rows)
    for L in range(lm.n_layers):
        assert clean.mass[L].shape == (lm.model.config.num_attention_heads, end - e)
        assert (clean.mass[L] > 0).any()  # (sliding-window layers cannot see the span from far queries)
        if L in knocked:
            assert torch.equal(ko.mass[L], torch.zeros_like(ko.mass[L]))
        elif L < min(knocked):
            torch.testing.assert_close(ko.mass[L], clean.mass[L], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ko.mass[2], clean.mass[2])  # later layers see the changed residual


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generation_under_knockout_and_kv_equals_one_at_a_time(arch):
    lm = tiny_model(arch)
    caps = _caps(lm, ["knockout_persona", "kv_persona"])
    from lac.patching import change_row

    rows = []
    for cap in caps:
        for name, layers in (("knockout_persona", (1, 2)), ("kv_persona", (0, 2))):
            change = get_intervention(name).change(cap, "p_last", layers)
            rows.append(change_row(cap, change, len(cap.prompts[change.host].ids)))
    batched, _ = greedy(lm, rows, 8)
    for r, toks in zip(rows, batched, strict=True):
        alone, _ = greedy(lm, [r], 8)
        assert alone[0] == toks
    assert len({tuple(t) for t in batched}) > 1


@pytest.mark.parametrize("arch", ARCHS)
def test_attn_persona_equals_hf_output_attentions(arch):
    from lac.patching import attention_mass
    from lac.sites import window_first_position

    lm = tiny_model(arch)
    caps = _caps(lm, ["knockout_persona"])
    got = attention_mass(lm, caps, ["p_last", "g1"], max_rows=2)
    assert len(got) == len(caps) * 2 * lm.n_layers
    for cap, site, L, values in got:
        xy = cap.traces["XY"]
        s, e = cap.prompts["XY"].span
        with torch.no_grad():
            att = lm.model(torch.tensor([xy.ids], device=lm.device), output_attentions=True).attentions[L][0]  # HF eager
        on_span = att[:, :, s:e].sum(-1)  # [heads, queries]
        q = cap.pos("XY", site)
        w = window_first_position(site, len(cap.prompts["XY"].ids))
        torch.testing.assert_close(values["attn_persona"], float(on_span[:, q].mean()), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(values["attn_persona_max"], float(on_span[:, q].max()), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(values["attn_persona_window"], float(on_span[:, w : w + 10].mean()),
                                   rtol=1e-4, atol=1e-6)
    assert max(v["attn_persona"] for *_, v in got) > 0.01


def test_teacher_forced_roles_share_one_forward(monkeypatch):
    """BB, XB and BY continue the reference together: one forward for every cell and role (on CPU a
    forward of two-token rows costs its weight reads, not its rows); their residuals stay exact."""
    import lac.capture as capture

    lm = tiny_model("qwen2")
    calls = []
    real = capture.run_rows
    monkeypatch.setattr(capture, "run_rows", lambda lm_, rows, **kw: (calls.append(len(rows)), real(lm_, rows, **kw))[1])
    needs = roles_needed([get_intervention("additive")])
    caps = capture_cells(lm, Book(), CELLS, roles=needs.roles, hosts=needs.hosts, batch_size=len(CELLS))
    assert calls == [3 * len(CELLS)]
    for cap in caps:
        for role in ("BB", "XB", "BY"):
            ids = list(cap.prompts[role].ids) + cap.ref[:2]
            h = _hidden(lm, ids)
            for site in ("p_last", "g1", "g2"):
                torch.testing.assert_close(cap.h(role, site, 1), h[1][0, cap.pos(role, site)].float().cpu(),
                                           atol=1e-5, rtol=1e-5)

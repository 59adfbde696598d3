"""Designs beyond "As X, Y" (METHOD.md): templates as data, k-factor decompositions, steering, swap.

Numbers are checked against plain HF forwards of separately run prompts (tiny random
models, token-id prompts with known factor spans) and against the identities METHOD states.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lac.capture import capture_cells
from lac.grid import Cell, Factor, Grid, GridError, grid_from_mapping, with_partners
from lac.interventions import Job, get_intervention, roles_needed
from lac.metrics import design_geometry, geometry, interactions, main_effects
from lac.patching import kl_rows
from lac.prompts import Prompt, PromptBook, PromptError, encode_chat, role_messages
from lac.sites import SITES, site_position
from tests.conftest import assert_kl_close
from tests.test_controls import _forward, _hidden, _ref
from tests.tiny import tiny_model

# The random tiny models' logits reach ~30, so float32 log-softmax carries ~1e-6 of noise per
# window position in lac and in the plain forward alike: KL agrees to METHOD's rtol 1e-3 + atol
# 1e-6 where it is >> that floor, and within NOISE_ATOL everywhere (a patch that wrote nothing
# would still fail: the KLs here are >= 1e-4).
NOISE_ATOL = 5e-6


def assert_kl_matches(got: float, want: float, what) -> None:
    assert_kl_close(got, want, what, atol=NOISE_ATOL if want < 1e-3 else 1e-6)

HEAD, SEP, TAIL = (2, 5, 6), (7,), (9, 10, 11)
LEVELS = {  # factor -> (baseline ids, {level: ids})
    "persona": ((12, 13), {"p1": (14, 15, 16), "p2": (18,)}),
    "task": ((20, 21, 22), {"t1": (23, 24), "t2": (25, 26, 27)}),
    "format": ((40,), {"f1": (41, 42), "f2": (43,)}),
}


def design(k: int) -> Grid:
    names = list(LEVELS)[:k]
    factors = tuple(Factor(n, "XYF"[i], "b", {lv: lv for lv in LEVELS[n][1]}) for i, n in enumerate(names))
    return Grid(f"tiny{k}", factors, messages=(("user", " ".join(f"{{{n}}}" for n in names)),))


class Book:
    """Token-id prompts of a k-factor design: HEAD + slot_1 + SEP + slot_2 ... + TAIL."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def get(self, cell, role):
        ids, spans = list(HEAD), []
        for f, letter in zip(self.grid.factors, role, strict=True):
            base, levels = LEVELS[f.name]
            level = cell.level(f.name)
            if letter == "S":
                level = self.grid.partners[f.name][level]
            part = base if letter == "B" else levels[level]
            spans.append((f.name, len(ids), len(ids) + len(part)))
            ids += list(part) + list(SEP)
        ids += TAIL
        span = next((s, e) for n, s, e in spans if n == "persona")
        return Prompt(tuple(ids), len(ids) - len(TAIL) - 1, span, tuple(spans))


def cells(grid: Grid) -> list[Cell]:
    return grid.cells()[:3]


def captured(lm, grid, ivs):
    needs = roles_needed(ivs, grid)
    return capture_cells(lm, Book(grid), cells(grid), roles=needs.roles, hosts=needs.hosts,
                         trace_hosts=needs.trace_hosts, span_hosts=needs.span_hosts, batch_size=2)


def plain_h(lm, prompt: Prompt, ref, site: str, layer: int) -> torch.Tensor:
    """Block input at (site, layer) of one plain forward over prompt + ref."""
    pos = site_position(site, len(prompt.ids), prompt.p_user_last)
    return _hidden(lm, list(prompt.ids) + list(ref[:3]))[layer][0, pos].float().cpu()


# --------------------------------------------------------------------------- k factors


@pytest.mark.parametrize("arch", ["gemma2", "qwen2"])
def test_three_factor_decomposition_equals_plain_and_is_exact(arch):
    lm = tiny_model(arch)
    grid = design(3)
    assert grid.roles() == ["BBB", "XBB", "BYB", "BBF", "XYB", "XBF", "BYF", "XYF"]
    caps = captured(lm, grid, [get_intervention("additive", grid)])
    names = grid.factor_names
    three_way = 0.0
    for cap in caps:
        ref = _ref(lm, list(Book(grid).get(cap.cell, "XYF").ids))
        assert cap.ref == ref  # the reference is P_all's greedy continuation
        for site, L in itertools.product(SITES, (1, 3)):
            h = {s: cap.h(grid.role(s), site, L) for s in grid.subsets()}
            plain = {s: plain_h(lm, Book(grid).get(cap.cell, grid.role(s)), ref, site, L) for s in grid.subsets()}
            d, i = main_effects(h, names), interactions(h, names)
            d0, i0 = main_effects(plain, names), interactions(plain, names)
            for f in names:
                torch.testing.assert_close(d[f], d0[f], rtol=1e-3, atol=1e-5)
            assert set(i) == {("persona", "task"), ("persona", "format"), ("task", "format"), names}
            for s in i:
                torch.testing.assert_close(i[s], i0[s], rtol=1e-3, atol=1e-5)
            # h_all = h_{} + sum_f D_f + sum_S I_S, to float32 precision
            rebuilt = h[()] + sum(d.values()) + sum(i.values())
            torch.testing.assert_close(rebuilt, h[names], rtol=0, atol=1e-5 * float(h[names].abs().max()))
            three_way = max(three_way, float(i[names].norm()))
            rows = {(m, f): v for m, f, v in design_geometry(h, names)}
            total = h[names] - h[()]
            summed = sum(d.values())
            if float(total.norm()) < 1e-3 * float(h[names].norm()):
                continue  # (a sliding window hides the factors from this site at layer 1: noise)
            assert rows[("cos_all_sum", "")] == pytest.approx(
                float(torch.dot(total, summed) / (total.norm() * summed.norm())), rel=1e-5)
            assert rows[("inter_ratio", "")] == pytest.approx(float((total - summed).norm() / total.norm()), rel=1e-5)
            assert rows[("inter_share", "persona+task+format")] == pytest.approx(
                float(i[names].norm() / total.norm()), rel=1e-5)
            assert ("cos_pair", "persona+format") in rows
    assert three_way > 1e-3  # a real 3-way term somewhere, so the identity is not between zeros


def test_two_factor_design_geometry_is_the_papers():
    g = torch.Generator().manual_seed(0)
    h = {s: torch.randn(16, generator=g) for s in [(), ("persona",), ("task",), ("persona", "task")]}
    got = design_geometry(h, ["persona", "task"])
    want = geometry(h[()], h[("persona",)], h[("task",)], h[("persona", "task")])
    assert [(m, v) for m, f, v in got] == list(want.items()) and {f for _, f, _ in got} == {""}


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_additive_and_remove_any_factor_equal_plain(arch):
    lm = tiny_model(arch)
    grid = design(3)
    ivs = [get_intervention("additive", grid), get_intervention("remove_format", grid),
           get_intervention("remove_x", grid)]
    assert ivs[1].name == "remove_format" and ivs[2].factor == "persona"
    caps = captured(lm, grid, ivs)
    jobs = [Job(iv, "p_last", (2,)) for iv in ivs]
    got = kl_rows(lm, caps, jobs)
    assert len(got) == len(caps) * len(jobs)
    book, big = Book(grid), 0
    for cap, job, _, kl in got:
        p = {r: book.get(cap.cell, r) for r in grid.roles()}
        ref = _ref(lm, list(p["XYF"].ids))
        # the residuals lac captured (equal to plain ones: the test above); the vector's formula,
        # the patched run and the clean target are written out here
        h = {r: cap.h(r, "p_last", 2) for r in grid.roles()}
        if job.intervention.name == "additive":
            vec = h["BBB"] + (h["XBB"] - h["BBB"]) + (h["BYB"] - h["BBB"]) + (h["BBF"] - h["BBB"])
        elif job.intervention.name == "remove_format":
            vec = h["XYF"] - (h["BBF"] - h["BBB"])
        else:
            vec = h["XYF"] - (h["XBB"] - h["BBB"])
        want = plain_patched_kl(lm, p["XYF"], ref, [(2, vec)], "p_last")
        assert_kl_matches(kl, want, (arch, job.intervention.name))
        big += want > 1e-4
    assert big >= len(got) // 2  # mostly real changes, far above the noise floor


def plain_patched_kl(lm, host: Prompt, ref, writes, site, target: Prompt | None = None) -> float:
    """KL(clean target || host with `writes` [(layer, vector)] at the site), prompt + ref teacher-forced."""
    target = target or host
    w0 = {"p_last": 0, "g1": 1, "g2": 2}[site]
    tail = list(ref[: w0 + 10])

    def window(p: Prompt, lp):
        first = len(p.ids) - 1 + w0
        return lp[first : first + 10]

    clean = window(target, _forward(lm, list(target.ids) + tail))
    pos = len(host.ids) - 1 + w0
    lp = window(host, _forward(lm, list(host.ids) + tail, writes=[(L, pos, v) for L, v in writes]))
    return float((clean.exp() * (clean - lp)).sum())


# --------------------------------------------------------------------------- steering and swap


@pytest.mark.parametrize("arch", ["gemma2", "qwen2"])
def test_steer_and_swap_identities(arch):
    lm = tiny_model(arch)
    grid = with_partners(design(2), "persona", "same")
    iv = lambda name, **kw: get_intervention(name, grid, **kw)  # noqa: E731
    ivs = [iv("steer", alpha=1.0), iv("steer", alpha=0.0), iv("remove_x"), iv("steer_host", alpha=0.0),
           iv("host_none"), iv("swap"), iv("clean")]
    caps = captured(lm, grid, ivs)
    got: dict = {}
    for site in ("p_last", "g2"):
        jobs = [Job(v, site, (1,) if v.writes else ()) for v in ivs]
        for cap, job, metric, kl in kl_rows(lm, caps, jobs):
            got[(cap.cell.key, site, job.intervention.name, job.intervention.alpha, metric)] = kl
    for c in cells(grid):
        for site in ("p_last", "g2"):
            def k(name, alpha=None, metric="kl", c=c, site=site):
                return got[(c.key, site, name, alpha, metric)]
            assert k("steer", 1.0) <= 1e-6  # alpha 1 writes h_XY back: clean
            assert k("steer", 0.0) == k("remove_x")  # alpha 0 is remove_x, bit for bit
            assert k("steer_host", 0.0) == k("host_none")  # alpha 0 writes the host's own residual
            assert k("host_none") > 1e-4  # the host really differs
            assert k("swap") <= 1e-6 and k("swap", metric="kl_partner") <= 1e-6  # X' = X: clean
            assert k("clean") == 0.0


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_steer_and_swap_equal_plain(arch):
    lm = tiny_model(arch)
    grid = with_partners(design(2), "persona", "next")
    assert grid.partners["persona"] == {"p1": "p2", "p2": "p1"}
    ivs = [get_intervention("steer", grid, alpha=2.5), get_intervention("steer_host", grid, alpha=0.5),
           get_intervention("swap", grid)]
    caps = captured(lm, grid, ivs)
    book = Book(grid)
    rows = kl_rows(lm, caps, [Job(v, "g1", (2,)) for v in ivs])
    assert {m for *_, m, _ in rows} == {"kl", "kl_partner"}
    small = 0
    for cap, job, metric, kl in rows:
        p = {r: book.get(cap.cell, r) for r in ("BB", "XB", "BY", "XY", "SB", "SY")}
        ref = _ref(lm, list(p["XY"].ids))
        h = {r: plain_h(lm, p[r], ref, "g1", 2) for r in p}
        name = job.intervention.name
        if name == "steer":
            host, vec = p["XY"], h["XY"] + 1.5 * (h["XB"] - h["BB"])
        elif name == "steer_host":
            host, vec = p["BY"], h["BY"] + 0.5 * (h["XB"] - h["BB"])
        else:
            host, vec = p["XY"], h["XY"] - (h["XB"] - h["BB"]) + (h["SB"] - h["BB"])
        target = p["SY"] if metric == "kl_partner" else p["XY"]
        want = plain_patched_kl(lm, host, ref, [(2, vec)], "g1", target=target)
        assert_kl_matches(kl, want, (arch, name, metric, cap.cell.key))
        small += want < 1e-4
    assert small < len(rows)


# --------------------------------------------------------------------------- templates as data


SYSTEM = [{"role": "system", "content": "You are {persona}."}, {"role": "user", "content": "{task}"}]


def short_with(**extra):
    data = {"baseline": {"persona": "a thoughtful person", "task": "Give advice."},
            "personas": {"yoda": "Yoda", "marx": "Karl Marx"}, "tasks": {"haiku": "Write a haiku."}}
    return {**data, **extra}


@pytest.mark.parametrize("tok_name", ["qwen_tok", "llama_tok"])
def test_system_placement_renders_through_the_models_own_template(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    grid = grid_from_mapping(short_with(messages=SYSTEM), "sys")
    book = PromptBook(tok, grid)
    for cell in grid.cells():
        for role in ("BB", "XB", "BY", "XY", "bare"):
            msgs, _ = role_messages(grid, cell, role)
            chat = [{"role": r, "content": c} for r, c in msgs]
            want = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
            want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
            p = book.get(cell, role)
            assert list(p.ids) == list(want), (tok_name, cell, role)
            if role == "bare":
                assert [r for r, _ in msgs] == ["user"] and p.span is None
                continue
            s, e = p.span
            persona = grid.personas[cell.persona] if role[0] == "X" else grid.baseline_persona
            assert tok.decode(list(p.ids[s:e])).strip() == persona
            ts, te = p.slot_span("task")
            assert ts > e and te - 1 <= p.p_user_last
        # the persona sits in the system turn: its span ends before the user turn's text
        assert book.get(cell, "XY").span[1] < book.get(cell, "XY").slot_span("task")[0]


def test_system_message_on_a_template_without_system_role_is_a_clear_error(gemma_tok):
    grid = grid_from_mapping(short_with(messages=SYSTEM), "sys")
    with pytest.raises(PromptError, match=r"refuses messages with roles \['system', 'user'\].*no system role"):
        PromptBook(gemma_tok, grid).get(grid.cells()[0], "XY")


def test_paper_grid_keeps_its_identity_and_roles():
    grid = grid_from_mapping(short_with(), "short")
    assert grid.paper_design and grid.roles() == ["BB", "XB", "BY", "XY"]
    assert (grid.full, grid.empty, grid.host("persona"), grid.host("task")) == ("XY", "BB", "BY", "XB")
    same_as_messages = grid_from_mapping(short_with(messages=[{"role": "user", "content": "As {persona}, {task}"}]), "s")
    assert same_as_messages.content_hash() == grid.content_hash()  # the default template, spelled out
    assert grid_from_mapping(short_with(messages=SYSTEM), "sys").content_hash() != grid.content_hash()


def test_explicit_cell_list():
    data = {"messages": [{"role": "user", "content": "As {persona}, {task} {format}"}],
            "factors": {"persona": {"baseline": "a person", "levels": {"a": "A", "b": "B"}},
                        "task": {"baseline": "Do.", "levels": {"t": "T."}},
                        "format": {"baseline": "Plain.", "levels": {"x": "List.", "y": "Table."}}},
            "cells": [["a", "t", "y"], ["b", "t", "x"]]}
    grid = grid_from_mapping(data, "three")
    assert [c.key for c in grid.cells()] == ["a__t__y", "b__t__x"]
    assert grid.roles()[-1] == "XYF" and grid.factor("format").letter == "F"
    assert len(grid_from_mapping({k: v for k, v in data.items() if k != "cells"}, "three").cells()) == 4


BAD = [
    ({"messages": [{"role": "user", "content": "As {persona}, {task} in {style}"}]}, r"slot \{style\}.*no factor"),
    ({"messages": [{"role": "user", "content": "As {persona}, go."}]}, r"factor 'task' is used by no message"),
    ({"messages": [{"role": "user", "content": "{persona} {task} {persona}"}]}, r"slot \{persona\} appears twice"),
    ({"messages": [{"role": "user", "content": "{persona!r} {task}"}]}, r"slots are plain names"),
    ({"messages": [{"role": "system", "content": "{persona} {task}"}]}, r"last message must be the user turn"),
    ({"messages": [{"role": "robot", "content": "{persona} {task}"}]}, r"role 'robot'; allowed: system, user"),
]


@pytest.mark.parametrize("extra,match", BAD)
def test_bad_templates_are_clear_errors(extra, match):
    with pytest.raises(GridError, match=match):
        grid_from_mapping(short_with(**extra), "bad")


def factors_grid(**change):
    f = {"persona": {"baseline": "a person", "levels": {"a": "A"}}, "task": {"baseline": "Do.", "levels": {"t": "T."}}}
    f.update(change)
    return {"messages": [{"role": "user", "content": "As {persona}, {task}"}], "factors": f}


def test_bad_factors_are_clear_errors(tmp_path):
    with pytest.raises(GridError, match=r"factor 'task' has no baseline text"):
        grid_from_mapping(factors_grid(task={"levels": {"t": "T."}}), "g")
    with pytest.raises(GridError, match=r"share the letter 'X'"):
        grid_from_mapping(factors_grid(task={"letter": "X", "baseline": "Do.", "levels": {"t": "T."}}), "g")
    with pytest.raises(GridError, match=r"letter 'B'; allowed: one capital A-Z except B \(baseline\)"):
        grid_from_mapping(factors_grid(task={"letter": "B", "baseline": "Do.", "levels": {"t": "T."}}), "g")
    with pytest.raises(GridError, match=r"'factors.task.levels' must be a non-empty mapping"):  # not 'tasks'
        grid_from_mapping(factors_grid(task={"baseline": "Do.", "levels": {}}), "g")
    with pytest.raises(GridError, match=r"either 'factors:' or the paper's"):
        grid_from_mapping({**factors_grid(), "personas": {"a": "A"}}, "g")
    with pytest.raises(GridError, match=r"cell \['a', 'zz'\] has level 'zz' for factor 'task'; allowed: t"):
        grid_from_mapping({**factors_grid(), "cells": [["a", "zz"]]}, "g")
    from lac.grid import load_grid

    path = tmp_path / "dup.yaml"
    path.write_text("factors:\n  persona: {baseline: p, levels: {a: A, a: B}}\n  task: {baseline: t, levels: {x: X}}\n"
                    "messages: [{role: user, content: '{persona} {task}'}]\n")
    with pytest.raises(GridError, match=r"duplicate key 'a'"):
        load_grid(path)


def test_swap_rows_record_their_partner_rule():
    """The rule is part of every swap row (`partner`), so two swap jobs with different rules are two
    conditions in a report; every other intervention's rows hold ""."""
    from lac.config import build_spec
    from lac.runner import _about
    from tests.conftest import compose

    for rule, label in (("next", "next"), ("same", "same"),
                        ("{yoda:marx,marx:buffett,buffett:angelou,angelou:yoda}",
                         "angelou>yoda,buffett>angelou,marx>buffett,yoda>marx")):
        (iv,) = build_spec(compose(["intervention=swap", f"intervention.partner={rule}"])).interventions
        assert _about(iv) == {"factor": "persona", "alpha": None, "partner": label}
    (iv,) = build_spec(compose(["intervention=remove"])).interventions
    assert _about(iv)["partner"] == ""


def test_bad_intervention_values_are_clear_errors():
    from lac.config import ConfigError, build_spec
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=r"intervention.alpha='lots': allowed: a finite number"):
        build_spec(compose(["intervention=steer", "intervention.alpha=lots"]))
    with pytest.raises(ConfigError, match=r"intervention.partner: .*level 'nobody' is no persona.*allowed: buffett"):
        build_spec(compose(["intervention=swap", "intervention.partner={nobody:yoda}"]))
    with pytest.raises(ConfigError, match=r"intervention.factor='tone': not a factor of grid 'short'; allowed: persona, task"):
        build_spec(compose(["intervention=steer", "intervention.factor=tone"]))
    with pytest.raises(ConfigError, match=r"unknown intervention 'remove_tone'|not a factor"):
        build_spec(compose(["intervention=remove", "intervention.factor=tone"]))
    spec = build_spec(compose(["intervention=remove", "intervention.factor=task"]))
    assert spec.interventions[0].name == "remove_task"
    for cond in ("swap", "steer_host"):  # a partner rule / dose comes only with the job's own intervention
        with pytest.raises(ConfigError, match=rf"marker condition {cond} takes its .* add intervention={cond}"):
            build_spec(compose(["experiment=markers", f"markers.conditions=[clean,{cond}]"]))
    spec = build_spec(compose(["intervention=steer", "intervention.alpha=2", "experiment=markers"]))
    assert spec.conditions[-1] == "steer" and spec.condition_ivs[-1].alpha == 2.0


def test_encode_chat_spans_locate_every_slot(qwen_tok):
    grid = grid_from_mapping(short_with(messages=SYSTEM), "sys")
    msgs, slots = role_messages(grid, grid.cells()[0], "XY")
    p = encode_chat(qwen_tok, msgs, slots)
    assert qwen_tok.decode(list(p.ids[slice(*p.slot_span("task"))])).strip() == "Write a haiku."
    assert p.spans[0][0] == "persona" and p.span == p.slot_span("persona")


def test_controls_take_any_factor(qwen_tok):
    """knockout / kv / span controls act on `intervention.factor`'s span (default persona)."""
    from lac.capture import CellCapture
    from lac.config import build_spec
    from tests.conftest import compose

    spec = build_spec(compose(["intervention=knockout_persona", "intervention.factor=task",
                               "model.attn_implementation=eager", "site=p_last", "layer=3"]))
    iv = spec.interventions[0]
    assert iv.factor == "task" and iv.host == "XY"
    grid = spec.grid
    book = PromptBook(qwen_tok, grid)
    cell = grid.cells()[0]
    cap = CellCapture(cell, [], {r: book.get(cell, r) for r in ("XY", "XL", "LY")})
    ts, te = cap.prompts["XY"].slot_span("task")
    assert cap.prompts["XY"].slot_span("persona")[1] < ts  # the task's span, not the persona's
    change = iv.change(cap, "p_last", (3, 4))
    assert change.knockout == [(3, ts, te), (4, ts, te)] and change.start == te
    kv = get_intervention("kv_persona", grid, factor="task")
    assert kv.host == "XL"  # the task length-matched: XY with the task's span replaced
    assert len(cap.prompts["XL"].ids) == len(cap.prompts["XY"].ids)
    assert cap.prompts["XL"].ids[:ts] == cap.prompts["XY"].ids[:ts] != cap.prompts["LY"].ids[:ts]
    assert kv.change(cap, "p_last", (2,)).kv_from_xy == [(2, ts, te)]
    from lac.config import job_key

    plain = compose(["intervention=knockout_persona", "model.attn_implementation=eager"])
    explicit = compose(["intervention=knockout_persona", "intervention.factor=persona", "model.attn_implementation=eager"])
    assert job_key(plain) == job_key(explicit)  # the default factor leaves job keys as before designs


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_marker_generations_under_steer_and_swap(arch):
    from lac.runner import marker_generations

    lm = tiny_model(arch)
    grid = with_partners(design(2), "persona", "same")
    iv = lambda name, **kw: get_intervention(name, grid, **kw)  # noqa: E731
    conds = [iv("clean"), iv("steer", alpha=1.0), iv("swap"), iv("remove_x"), iv("steer", alpha=0.0),
             iv("steer", alpha=25.0)]
    for i, name in ((1, "steer1"), (4, "steer0"), (5, "steer25")):  # in one call, doses need their own names
        conds[i].name = name
    caps = captured(lm, grid, conds)
    gens = marker_generations(lm, caps, conds, [3], book=Book(grid), max_new_tokens=8, batch_rows=5)
    toks = {(cap.cell.key, cond): tk for cap, cond, _, tk in gens}
    assert len(toks) == len(cells(grid)) * len(conds)
    for c in cells(grid):
        assert toks[(c.key, "steer1")] == toks[(c.key, "clean")]  # alpha 1: clean
        assert toks[(c.key, "swap")] == toks[(c.key, "clean")]  # X' = X: clean
        assert toks[(c.key, "steer0")] == toks[(c.key, "remove_x")]  # alpha 0: remove_x
    assert any(toks[(c.key, "steer25")] != toks[(c.key, "clean")] for c in cells(grid))  # a real dose changes text


NO_PERSONA = """\
messages:
  - {role: user, content: "As {speaker}, {topic}"}
factors:
  speaker: {letter: X, baseline: a thoughtful person, levels: {yoda: Yoda, marx: Karl Marx}}
  topic: {letter: Y, baseline: Give advice., levels: {haiku: Write a haiku., policy: Comment on a policy.}}
"""
ONE_PERSONA = """\
baseline: {persona: a thoughtful person, task: Give advice.}
personas: {yoda: Yoda}
tasks: {haiku: Write a haiku., policy: Comment on a policy.}
"""
SYSTEM_BOTH = """\
messages:
  - {role: system, content: "You are {persona}. {task}"}
  - {role: user, content: "Please answer now."}
factors:
  persona: {baseline: a thoughtful person, levels: {yoda: Yoda, marx: Karl Marx}}
  task: {baseline: Give advice., levels: {haiku: Write a haiku.}}
"""


@pytest.mark.parametrize("text, extra, match", [
    # next of the only level is the level itself: a swap that silently writes the clean run back
    (ONE_PERSONA, ["intervention=swap"], r"partner rule next needs two or more persona levels; grid 'g' has yoda only"),
    # bare of a design without a persona was the full prompt (KL 0 as the "floor")
    (NO_PERSONA, ["intervention=bare"], r"grid 'g' has no persona factor \(factors: speaker, topic\), so 'bare'"),
    # bare dropped the task with the system message that held both
    (SYSTEM_BOTH, ["intervention=bare"], r"the system message 'You are \{persona\}. \{task\}' holds \{persona\} and \{task\}"),
    (SYSTEM_BOTH + "markers: {yoda: [force], marx: [capital]}\n", ["experiment=markers", "markers.conditions=[clean,bare]"],
     r"holds \{persona\} and \{task\}"),
    # attn_persona on a design without a persona: a traceback after the clean captures
    (NO_PERSONA, ["attn_persona=true", "model.attn_implementation=eager"],
     r"attn_persona=true measures attention on the persona span, and grid 'g' has no persona factor"),
    # an intervention about one factor names how to choose it
    (NO_PERSONA, ["intervention=host_none_lm", "~intervention.factor"],
     r"intervention host_none_lm acts on one factor and grid 'g' has no persona factor: set \+intervention.factor="),
])
def test_designs_without_what_an_intervention_needs_are_refused(tmp_path, text, extra, match):
    from lac.config import build_spec
    from lac.errors import LacError
    from tests.conftest import compose

    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(LacError, match=match):
        build_spec(compose(["grid=custom", f"grid.path={path}", "site=p_last", "layer=3", *extra]))


def test_whole_design_interventions_run_on_a_grid_without_persona(tmp_path):
    """additive / clean do not act on one factor: a design without a persona needs no factor for them."""
    from lac.config import build_spec
    from tests.conftest import compose

    path = tmp_path / "g.yaml"
    path.write_text(NO_PERSONA)
    for iv in ("additive", "clean"):
        spec = build_spec(compose(["grid=custom", f"grid.path={path}", f"intervention={iv}", "site=p_last", "layer=3"]))
        assert spec.interventions[0].name == iv


@pytest.mark.parametrize("extra", [["intervention=host_none_lm", "intervention.layers=[99]"],
                                   ["intervention=host_none", "intervention.layers=from:99"],
                                   ["intervention=clean", "intervention.layers=[-1]"]])
def test_layers_of_interventions_that_write_nothing_are_still_checked(extra):
    from lac.config import ConfigError, build_spec
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=r"intervention.layers"):
        build_spec(compose(["site=p_last", "layer=3", *extra]))

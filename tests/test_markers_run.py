"""Marker runs on the embedded model: batched patched generation against `generate` and the paper's script."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from lac.config import build_spec
from lac.interventions import additive_vector
from lac.markers import score
from lac.prompts import PromptBook
from lac.runner import compute_cells
from tests.conftest import DATA, compose

REFERENCE = DATA / "embedded-qwen0.5-v17.json"
pytestmark = pytest.mark.slow  # the embedded model

CELLS = ("engineer__arch", "chef__plan")


@pytest.fixture(scope="module")
def marker_run(qwen):
    spec = build_spec(compose(["experiment=markers", "tracker=none"]))
    cells = [c for c in spec.grid.cells() if c.key in CELLS]
    book = PromptBook(qwen.tokenizer, spec.grid)
    rows, gens = compute_cells(qwen, spec, cells, book=book, cache=None, max_rows=64, batch_cells=12,
                               ctx={"model": "qwen0.5", "model_id": "embedded", "grid": "markers"})
    return spec, book, pd.DataFrame(rows), gens


def test_texts_equal_the_papers_script_token_for_token(marker_run):
    """embedded-qwen0.5-v17.json: the paper's marker script (layer 14, 80 greedy tokens) on this model."""
    _, _, _, gens = marker_run
    ref = json.loads(REFERENCE.read_text())
    assert ref["inject_layer"] == 14 and ref["n_gen_tokens"] == 80
    assert len(gens) == len(CELLS) * 4
    for g in gens:
        want = ref["results"][g["cell"]][{"remove_x": "remove_X"}.get(g["condition"], g["condition"])]
        assert g["text"] == want["text"], (g["cell"], g["condition"])
        assert sorted(g["hits"]) == sorted(want["hits"])


def test_rows_score_the_saved_texts(marker_run):
    spec, _, df, gens = marker_run
    for g in gens:
        s = score(g["text"], spec.grid.markers[g["persona"]])
        got = df[(df.cell == g["cell"]) & (df.intervention == g["condition"])]
        assert got[got.metric == "marker_any"].value.item() == s["marker_any"]
        assert got[got.metric == "marker_distinct"].value.item() == s["marker_distinct"]
        assert got.layer.iloc[0] == (14 if g["condition"] in ("additive", "remove_x") else -1)


def test_batched_generation_equals_one_prompt_generate(qwen, marker_run):
    """Same tokens as HF `generate` on one prompt with a pre-hook that patches the prompt pass only."""
    spec, book, _, gens = marker_run
    from lac.capture import capture_cells

    cell = next(c for c in spec.grid.cells() if c.key == CELLS[1])
    cap = capture_cells(qwen, book, [cell], depth=15)[0]
    xy = cap.prompts["XY"]
    vec = additive_vector(cap, "p_last", 14)
    calls = []

    def hook(module, args, kwargs):
        calls.append(args[0].shape[1])
        if args[0].shape[1] == 1:
            return None  # generated tokens are not patched
        h = args[0].clone()
        h[0, len(xy.ids) - 1] = vec
        return (h, *args[1:]), kwargs

    for cond, patched in (("clean", False), ("additive", True)):
        handle = qwen.layers[14].register_forward_pre_hook(hook, with_kwargs=True) if patched else None
        try:
            with torch.no_grad():
                out = qwen.model.generate(torch.tensor([xy.ids]), max_new_tokens=80, do_sample=False, num_beams=1)
        finally:
            if handle:
                handle.remove()
        want = out[0, len(xy.ids):].tolist()
        got = next(g for g in gens if g["cell"] == cell.key and g["condition"] == cond)["tokens"]
        assert got[: len(want)] == want, cond
    assert calls[0] == len(xy.ids) and set(calls[1:]) == {1}

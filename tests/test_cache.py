"""The activation cache: later jobs read clean captures instead of recomputing; bad entries are never trusted."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch

from lac import cache as cache_mod
from lac.cache import ActivationCache
from lac.config import build_spec
from lac.engine import COUNTS
from lac.prompts import PromptBook
from lac.runner import compute_cells
from lac.sites import REF_TOKENS
from tests.conftest import assert_same_results, compose

CTX = {"model": "qwen0.5", "model_id": "embedded", "grid": "short"}
pytestmark = pytest.mark.slow  # every test computes on the embedded model


def _job(qwen, layer, cache):
    spec = build_spec(compose(["tracker=none", "site=p_last", f"layer={layer}"]))
    cells = spec.grid.cells()[:2]
    before = dict(COUNTS)
    rows, _ = compute_cells(qwen, spec, cells, book=PromptBook(qwen.tokenizer, spec.grid), cache=cache,
                            max_rows=64, batch_cells=12, ctx=CTX)
    work = {k: COUNTS[k] - before[k] for k in COUNTS}
    return pd.DataFrame(rows), work, spec


def test_second_job_reads_captures_from_disk(qwen):
    """engine.cache_traces=false: the small part is read; the XY trace is rebuilt by forwards."""
    spec = build_spec(compose(["tracker=none"]))
    df1, cold, _ = _job(qwen, 6, ActivationCache(qwen, spec.grid, traces=False))
    cache_mod._MEMORY.clear()  # another process: only the disk cache is shared
    c2 = ActivationCache(qwen, spec.grid, traces=False)
    df2, warm, _ = _job(qwen, 6, c2)
    assert c2.hits == {"memory": 0, "disk": 2, "miss": 0}
    # BB, XB, BY are read, not run; XY is not decoded again (its 11 decode steps are gone): its
    # prompt + stored ref are teacher-forced for the KV that patched rows continue
    assert warm["forwards"] <= cold["forwards"] - (REF_TOKENS - 1)
    # exactly: each distinct XY prompt prefix once + XY's ref[:11] per cell (all blocks) + the
    # patched rows (p_last window: 10 tokens from block 6 on)
    book = PromptBook(qwen.tokenizer, spec.grid)
    xy = [book.get(c, "XY").ids for c in spec.grid.cells()[:2]]
    distinct_prefixes = len({ids[:k] for ids in xy for k in range(1, len(ids) + 1)})
    n = qwen.n_layers
    assert warm["block_tokens"] == distinct_prefixes * n + 2 * (REF_TOKENS - 1) * n + 2 * 10 * (n - 6)
    assert warm["block_tokens"] < cold["block_tokens"]
    # teacher-forced vs decoded XY trace: the same numbers up to float32 batch-shape noise
    assert_same_results(df1, df2)


def test_second_job_reads_traces_from_disk(qwen):
    """engine.cache_traces (auto on a CPU): the XY trace patched rows continue is read too, so a
    second process runs only its patched rows and continues the very trace the first computed."""
    spec = build_spec(compose(["tracker=none"]))
    c1 = ActivationCache(qwen, spec.grid, traces=True)
    df1, cold, _ = _job(qwen, 6, c1)
    first = {key: cap for (k, key), cap in cache_mod._MEMORY.items() if k == c1.key}
    cache_mod._MEMORY.clear()  # another process: only the disk cache is shared
    c2 = ActivationCache(qwen, spec.grid, traces=True)
    df2, warm, _ = _job(qwen, 6, c2)
    assert c2.hits == {"memory": 0, "disk": 2, "miss": 0}
    n = qwen.n_layers
    assert warm["forwards"] == 1 and warm["block_tokens"] == 2 * 10 * (n - 6)  # the patched rows alone
    pd.testing.assert_frame_equal(df1, df2)  # bitwise: the same trace, not a rebuilt one
    again = {key: cap for (k, key), cap in cache_mod._MEMORY.items() if k == c2.key}
    assert set(again) == set(first) and len(first) == 2
    for key, cap in first.items():
        a, b = cap.traces["XY"], again[key].traces["XY"]
        assert (a.ids, a.first, a.depth) == (b.ids, b.first, b.depth) and len(a.kv) == len(b.kv) == n
        assert all(torch.equal(x, y) for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True)
                   for x, y in ((ka, kb), (va, vb)))
        assert torch.equal(a.hidden, b.hidden) and b.hidden.device == qwen.device
        assert a.logp.keys() == b.logp.keys() and all(torch.equal(a.logp[q], b.logp[q]) for q in a.logp)
    cache_mod._MEMORY.clear()  # traces off: the stored ones are not read (rebuilt instead)
    df3, rebuilt, _ = _job(qwen, 6, ActivationCache(qwen, spec.grid, traces=False))
    assert rebuilt["forwards"] > 1
    assert_same_results(df1, df3)


def test_jobs_in_one_process_share_captures_in_memory(qwen):
    spec = build_spec(compose(["tracker=none"]))
    c = ActivationCache(qwen, spec.grid, disk=False)
    _, cold, _ = _job(qwen, 6, c)
    _, warm, _ = _job(qwen, 3, c)  # no deeper than the first job's captures
    assert c.hits["memory"] == 2
    assert warm["forwards"] == 1  # the patched rows only: one forward for the (site, layer) group
    assert warm["block_tokens"] < 0.2 * cold["block_tokens"]


def test_a_cache_switched_off_reads_nothing_an_earlier_job_left_in_memory(qwen):
    """engine.activation_cache=false (shared=False) recomputes, also in a notebook or a multirun."""
    spec = build_spec(compose(["tracker=none"]))
    _job(qwen, 3, ActivationCache(qwen, spec.grid, disk=False))
    off = ActivationCache(qwen, spec.grid, disk=False, shared=False)
    _, cold, _ = _job(qwen, 3, off)
    assert off.hits["memory"] == 0 and off.hits["miss"] == 2 and cold["forwards"] > 1
    _, warm, _ = _job(qwen, 3, off)  # within its own job the captures are kept, as before
    assert off.hits["memory"] == 2 and warm["forwards"] == 1


def test_corrupt_or_truncated_entry_is_reported_and_recomputed(qwen, caplog):
    spec = build_spec(compose(["tracker=none"]))
    c1 = ActivationCache(qwen, spec.grid, traces=True)
    df1, cold, _ = _job(qwen, 6, c1)
    files = sorted(c1.dir.glob("*.safetensors"))
    assert len(files) == 2
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # truncated
    raw = bytearray(files[1].read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte inside a tensor
    files[1].write_bytes(bytes(raw))
    cache_mod._MEMORY.clear()
    c2 = ActivationCache(qwen, spec.grid, traces=True)
    with caplog.at_level(logging.WARNING, logger="lac.cache"):
        df2, again, _ = _job(qwen, 6, c2)
    assert c2.hits == {"memory": 0, "disk": 0, "miss": 2}
    assert sum("corrupt" in r.getMessage() for r in caplog.records) == 2
    assert again["forwards"] == cold["forwards"]  # recomputed in full
    pd.testing.assert_frame_equal(df1, df2)
    assert all(f.stat().st_size > len(data) // 2 for f in files)  # rewritten whole


def test_a_trace_that_is_not_this_prompt_is_stale(qwen, caplog):
    """An entry whose stored trace does not continue the prompt today's tokenizer gives (a tokenizer
    that changed under the same chat template) is not trusted: deleted and recomputed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    spec = build_spec(compose(["tracker=none"]))
    c1 = ActivationCache(qwen, spec.grid, traces=True)
    df1, cold, _ = _job(qwen, 6, c1)
    path = sorted(c1.dir.glob("*.safetensors"))[0]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["trace_ids.XY"][3] += 1  # another token id, with a valid checksum: not corruption
    meta["sha256"] = cache_mod._digest(tensors)
    save_file(tensors, str(path), metadata=meta)
    cache_mod._MEMORY.clear()
    c2 = ActivationCache(qwen, spec.grid, traces=True)
    with caplog.at_level(logging.WARNING, logger="lac.cache"):
        df2, _, _ = _job(qwen, 6, c2)
    assert c2.hits == {"memory": 0, "disk": 1, "miss": 1}
    assert [r.getMessage() for r in caplog.records if "stale" in r.getMessage()] == [
        f"activation cache entry {path} is stale (its XY trace is not this prompt + ref): deleting it and recomputing"]
    pd.testing.assert_frame_equal(df1, df2)
    assert path.is_file() and torch.equal(load_file(str(path))["trace_ids.XY"][3:4], tensors["trace_ids.XY"][3:4] - 1)

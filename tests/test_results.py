"""The per-key job store: atomic parts, refusal of foreign folders, one writer per key."""

from __future__ import annotations

import multiprocessing as mp
import time

import pandas as pd
import pytest

from lac.results import JobStore, frame, summarize, summary_keys


def _rows(cells, layer=6):
    return [{"model": "m", "model_id": "m", "grid": "g", "cell": c, "persona": c.split("__")[0],
             "task": c.split("__")[1], "site": "p_last", "layer": layer, "layers": str(layer),
             "intervention": "additive", "metric": "kl", "value": float(i)} for i, c in enumerate(cells)]


def test_parts_roundtrip_and_untrusted_parts_are_dropped(tmp_path):
    store = JobStore(tmp_path, "k1")
    store.claim({"a": 1})
    store.write_part("p1", frame(_rows(["a__x", "b__x"])), ["a__x", "b__x"])
    store.write_part("p2", frame(_rows(["c__x"])), ["c__x"])
    (store.parts / "p3.parquet").write_bytes(b"PAR1 half a file")  # killed before its record
    (store.parts / "p4.json").write_text('{"cells": ["d__x"], "rows": 1}')  # record without data
    df, _, cells = store.read_parts()
    assert cells == {"a__x", "b__x", "c__x"} and len(df) == 3
    assert not (store.parts / "p3.parquet").exists()


def test_has_parts_sees_only_written_parts(tmp_path):
    store = JobStore(tmp_path, "k0")
    assert not store.has_parts()  # no folder yet
    store.claim({"a": 1})
    assert not store.has_parts()
    (store.parts / "p0.json").write_text('{"cells": ["d__x"], "rows": 1}')  # a record alone is no part
    assert not store.has_parts()
    store.write_part("p1", frame(_rows(["a__x"])), ["a__x"])
    assert store.has_parts() and store.read_parts()[2] == {"a__x"}


def test_a_job_starts_without_pandas():
    """pandas (~0.5 s of imports) loads beside the compute, not before it: importing the entry point
    and opening a fresh job store must not pull it in."""
    import subprocess
    import sys

    code = ("import sys, tempfile; import lac.run; from lac.results import JobStore; "
            "s = JobStore(tempfile.mkdtemp(), 'k'); s.claim({}); assert not s.has_parts(); "
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_a_folder_of_another_config_is_refused(tmp_path):
    JobStore(tmp_path, "k1").claim({"layer": 6})
    (tmp_path / "k2").mkdir()
    (tmp_path / "k1" / "config.json").rename(tmp_path / "k2" / "config.json")
    from lac.errors import LacError

    with pytest.raises(LacError, match="belongs to config key 'k1', not 'k2'"):  # one line, not a traceback
        JobStore(tmp_path, "k2").claim({"layer": 7})


def _hold(root, key, q, hold):
    with JobStore(root, key).lock():
        q.put(("in", time.monotonic()))
        time.sleep(hold)
        q.put(("out", time.monotonic()))


def test_twin_jobs_never_interleave(tmp_path):
    q = mp.get_context("fork").Queue()
    ps = [mp.get_context("fork").Process(target=_hold, args=(tmp_path, "k", q, 0.5)) for _ in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(30)
    ev = sorted((q.get() for _ in range(4)), key=lambda e: e[1])
    assert [e[0] for e in ev] == ["in", "out", "in", "out"]


def test_summary_keys_are_stable_names():
    df = frame(_rows(["a__x", "b__x", "c__x"], layer=14))
    s = summarize(df)
    keys = summary_keys(s)
    assert keys["kl/p_last/L14/additive/median"] == 1.0
    assert keys["kl/p_last/L14/additive/p25"] == pytest.approx(0.5)
    assert pd.api.types.is_integer_dtype(df.layer)


def test_markers_table_columns_line_up_for_long_condition_names():
    from lac.results import format_table

    rates = {"clean": dict(any_rate=0.125, any_cells=3, cells=24, distinct_mean=0.5),
             "knockout_persona_from": dict(any_rate=0.0, any_cells=0, cells=24, distinct_mean=0.0)}
    header, *rows = format_table({"markers": rates}).splitlines()
    col = header.index("any-marker rate") + len("any-marker rate")  # the rates end under their header
    assert [r[col - 5:col] for r in rows] == ["0.125", "0.000"]
    assert rows[1].startswith("knockout_persona_from ")


def test_marker_summary_names_the_dose_and_scores_swap_with_the_partners_markers():
    """A steer job's markers are shown with its alpha; a swap job's with the partner X''s markers beside
    its own (marker_any_partner: the same texts scored with X''s markers), in the summary, its keys and
    the console table."""
    from lac.results import format_table

    def mark(iv, metric, values, **kw):
        return [{"model": "m", "model_id": "m", "grid": "g", "cell": f"{p}__t", "persona": p, "task": "t",
                 "site": "p_last", "layer": 14, "layers": "14", "intervention": iv, "metric": metric,
                 "value": float(v), "factor": "persona", **kw} for p, v in zip("abcd", values, strict=True)]

    df = frame(mark("swap", "marker_any", [1, 0, 0, 0], partner="next")
               + mark("swap", "marker_distinct", [2, 0, 0, 0], partner="next")
               + mark("swap", "marker_any_partner", [1, 1, 1, 0], partner="next")
               + mark("swap", "marker_distinct_partner", [1, 2, 1, 0], partner="next")
               + mark("steer", "marker_any", [0, 1, 0, 0], alpha=2.0)
               + mark("steer", "marker_distinct", [0, 1, 0, 0], alpha=2.0))
    s = summarize(df)["markers"]
    assert s["swap"]["any_rate"] == 0.25 and s["swap"]["any_rate_partner"] == 0.75
    assert s["swap"]["any_cells_partner"] == 3 and s["swap"]["distinct_mean_partner"] == 1.0
    assert s["steer"]["alpha"] == 2.0 and "any_rate_partner" not in s["steer"]
    keys = summary_keys({"markers": s})
    assert keys["markers/swap/any_rate_partner"] == 0.75 and keys["markers/swap/distinct_mean"] == 0.5
    lines = format_table({"markers": s}).splitlines()
    assert [ln.split()[:2] for ln in lines[1:]] == [["swap", "0.250"], ["of", "partner"], ["steer", "a=2"]]
    assert lines[2].split()[2:] == ["0.750", "3/4", "1.00"]


def test_rows_of_an_older_schema_get_todays_columns():
    """A job reused from before schema 3 (lac.api returns its rows; the report reads them) gets `partner`
    "" and schema 3; schema 1 also factor "" and alpha NaN; rows of this schema are returned as they are."""
    from lac.results import current_schema
    from lac.schema import COLUMNS, SCHEMA_VERSION

    now = frame(_rows(["a__x", "b__x"]))
    assert current_schema(now) is now
    v2 = now.drop(columns="partner").assign(schema=2)
    up = current_schema(v2)
    assert set(up.columns) == set(COLUMNS) and set(up.partner) == {""} and set(up.schema) == {SCHEMA_VERSION}
    v1 = now.drop(columns=["partner", "factor", "alpha"]).assign(schema=1)
    up = current_schema(v1)
    assert set(up.factor) == {""} and up.alpha.isna().all() and set(up.columns) == set(COLUMNS)
    assert set(current_schema(v2.iloc[:0]).columns) == set(COLUMNS)  # a job without rows reads too

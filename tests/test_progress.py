"""Progress a user can see (issue 13): clean captures and generation show a bar on a terminal (or with
LAC_PROGRESS=1) and their time appears in the job's closing line."""

from __future__ import annotations

import time

from lac import tracking


def test_phase_progress_shows_a_bar_and_times_the_phase(monkeypatch, capsys):
    monkeypatch.setenv("LAC_PROGRESS", "1")
    monkeypatch.setattr(tracking, "_PHASES", {})
    monkeypatch.setattr(tracking, "_BESIDE", {})
    monkeypatch.setattr(tracking, "_PREDICT", {"seconds": 2.0, "cells": 12, "rows": 180})
    with tracking.phase_progress("clean captures", 12, "cell") as advance:
        advance(5)
        time.sleep(0.2)
        advance(7)
    err = capsys.readouterr().err
    assert "clean captures" in err and "12/12" in err
    with tracking.phase_progress("generation", 80, "tok") as advance:
        advance(80)
    assert tracking._PHASES["clean captures"] >= 0.2
    tracking.note_phase("start-up", 3.0)
    tracking.note_phase("model load", 2.5)
    tracking.note_phase("lightning set-up", 0.5)
    tracking.note_phase("writes", 0.25)
    tracking.note_beside("imports", 1.42)
    tracking.note_beside("W&B start", 1.0)
    tracking.note_beside("W&B start", 0.6)
    line = tracking.timing_line(10.0, 1.5)
    assert line.endswith("W&B 1.5 s; beside the compute: imports 1.4 s, W&B start 1.6 s")
    assert "clean captures 0.2 s" in line or "clean captures 0.3 s" in line
    assert "patched steps 2.0 s (12 cells, 180 rows, generation 0.0 s)" in line and "W&B 1.5 s" in line
    assert line.startswith("time: 14.8 s = start-up 3.0 s + model load 2.5 s + lightning set-up 0.5 s + ")
    assert "writes 0.2 s + other 4.8 s" in line or "writes 0.2 s + other 4.7 s" in line
    assert tracking._PHASES == {} and tracking._BESIDE == {}  # reset for the next job of the process
    tracking._PREDICT.update(seconds=1.0, cells=1, rows=1)
    line = tracking.timing_line(10.0, 0.0)
    assert "patched steps 1.0 s" in line and "beside" not in line  # no background work: no clause


def test_no_bar_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("LAC_PROGRESS", "0")
    with tracking.phase_progress("generation", 10, "tok") as advance:
        advance(10)
    assert "generation" not in capsys.readouterr().err


def test_benchmarks_read_the_closing_line_back(monkeypatch):
    """benchmarks/peer_nnsight.py records lac's phases from the line timing_line writes, beside-work too."""
    from benchmarks.peer_nnsight import lac_phases

    monkeypatch.setattr(tracking, "_PHASES", {})
    monkeypatch.setattr(tracking, "_BESIDE", {})
    monkeypatch.setattr(tracking, "_PREDICT", {"seconds": 2.0, "cells": 12, "rows": 144})
    tracking.note_phase("start-up", 2.4)
    tracking.note_phase("model load", 2.3)
    tracking.note_beside("imports", 1.7)
    got = lac_phases(f"[2026-11-24 00:53:25,521][lac][INFO] - {tracking.timing_line(12.0, 0.0)}\n")
    assert got == {"total": 14.4, "start_up": 2.4, "model_load": 2.3, "lightning_set_up": 0.0,
                   "clean_captures": 0.0, "patched_steps": 2.0, "writes": 0.0, "other": 7.7, "wandb": 0.0,
                   "beside_imports": 1.7}

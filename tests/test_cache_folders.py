"""The on-disk activation cache says what each key folder holds, and `python -m lac.cache` lists and prunes it."""

from __future__ import annotations

import json
import os
import time

import pytest

from lac import cache as cache_mod
from lac.cache import ABOUT, CAPTURE_VERSION, ActivationCache, folders, main
from lac.grid import grid_from_mapping
from lac.numerics import NUMERICS_VERSION
from tests.tiny import tiny_model


def _grid(name="g", persona="X"):
    return grid_from_mapping({"baseline": {"persona": "b", "task": "t"}, "personas": {"x": persona},
                              "tasks": {"y": "Y"}}, name)


def _age(path, days):
    past = time.time() - days * 86400
    os.utime(path, (past, past))


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("LAC_ACTIVATIONS_DIR", str(tmp_path / "acts"))
    return tmp_path / "acts"


def test_a_key_folder_records_what_it_holds_and_when_last_used(root):
    lm = tiny_model("qwen2")
    cache = ActivationCache(lm, _grid("short"))
    about = json.loads((cache.dir / ABOUT).read_text())
    assert about == {"model": lm.name, "model_id": lm.model_id, "dtype": "float32", "linear": lm.linear,
                     "grid": "short", "capture_version": CAPTURE_VERSION, "numerics_version": NUMERICS_VERSION}
    _age(cache.dir / ABOUT, 3)
    ActivationCache(lm, _grid("short"))  # the next job on the same cells
    assert time.time() - (cache.dir / ABOUT).stat().st_mtime < 60
    assert json.loads((cache.dir / ABOUT).read_text()) == about
    assert ActivationCache(lm, _grid("short"), disk=False).dir is None and len(list(root.iterdir())) == 1


def test_listing_and_pruning(root, capsys):
    lm = tiny_model("qwen2")
    current = ActivationCache(lm, _grid("now")).dir
    stale = ActivationCache(lm, _grid("old", persona="Z")).dir
    about = json.loads((stale / ABOUT).read_text())
    (stale / ABOUT).write_text(json.dumps({**about, "numerics_version": NUMERICS_VERSION - 1}))
    unknown = root / "0123456789abcdef0123"  # a folder from before about.json
    unknown.mkdir()
    (unknown / "a__b.safetensors").write_bytes(b"x" * 1000)
    _age(unknown / "a__b.safetensors", 10)
    (current / "x__y.safetensors").write_bytes(b"y" * 2000)

    rows = {r["key"]: r for r in folders()}
    assert {k: r["status"] for k, r in rows.items()} == {current.name: "current", stale.name: "stale",
                                                          unknown.name: "unknown"}
    assert rows[current.name]["cells"] == 1 and rows[unknown.name]["bytes"] == 1000
    assert 9.9 < rows[unknown.name]["days_unused"] < 10.1 and rows[current.name]["days_unused"] < 0.01

    assert main(["--prune-stale", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would delete {stale}" in out and stale.is_dir() and "grid now" in out and "written before" in out

    assert main(["--prune-stale"]) == 0
    assert not stale.exists() and current.is_dir() and unknown.is_dir()
    assert main(["--prune-unused", "7"]) == 0
    assert not unknown.exists() and current.is_dir()
    assert f"deleting {unknown}" in capsys.readouterr().out
    assert main(["--prune-stale", "--prune-unused", "7", "--dry-run"]) == 0  # nothing left to prune: said so
    assert capsys.readouterr().out.splitlines()[-1] == "nothing to delete: no folder is stale or unused for over 7 days"


def test_prune_refuses_negative_days(root, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--prune-unused", "-1"])
    assert e.value.code == 2 and "--prune-unused -1: give a number of days >= 0" in capsys.readouterr().err


def test_an_unwritable_cache_folder_is_not_an_error(root, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("lac.cache.atomic_write_json", refuse)
    cache = ActivationCache(tiny_model("qwen2"), _grid())
    assert cache.dir is not None and not (cache.dir / ABOUT).exists()
    assert cache_mod.folders() == []


def test_folders_lac_did_not_make_are_never_pruned(root, capsys):
    """LAC_ACTIVATIONS_DIR pointed at ~/.cache/lac by mistake: its models/ (converted weights, in nested
    folders) listed as 0 MiB, "unused for 20782 days" and deleted by --prune-unused. Now only capture-key
    folders holding files count; an empty key folder has no use date and is not "unused since 1970"."""
    models = root / "models" / "qwen-abc"
    models.mkdir(parents=True)
    (models / "model.safetensors").write_bytes(b"w" * 3000)
    odd = root / "notakey"
    odd.mkdir()
    (odd / "a.safetensors").write_bytes(b"z")
    _age(odd / "a.safetensors", 400)
    empty = root / "0123456789abcdef0123"
    empty.mkdir()
    rows = {r["key"]: r for r in folders()}
    assert rows["models"]["status"] == rows["notakey"]["status"] == "foreign" and rows["models"]["bytes"] == 3000
    assert rows[empty.name]["days_unused"] is None
    assert main(["--prune-unused", "0"]) == 0
    out = capsys.readouterr().out
    assert "models  not an activation-cache folder (0.0 MiB): left alone" in out
    assert (models / "model.safetensors").is_file() and odd.is_dir() and empty.is_dir()
    assert "nothing to delete" in out

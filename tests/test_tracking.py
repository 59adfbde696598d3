"""lac.tracking: offline W&B runs read back from their .wandb files; config checks; no-wandb path.

Every test runs with WANDB_MODE=offline, all W&B folders inside tmp_path, no API
key, HOME in tmp_path and WANDB_BASE_URL pointing at a closed local port: nothing
can reach a W&B server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from wandb_reader import find_runs, read_run

import lac.tracker_process
from lac import tracking
from lac.results import frame, summarize, summary_keys
from lac.schema import GEOMETRY_METRICS
from lac.tracking import (
    NoTracker,
    TrackerError,
    check_tracker,
    layer_free_keys,
    resolve_mode,
    run_id_for,
    start_tracker,
)

REPO = Path(__file__).resolve().parents[1]
CELLS = [("yoda", "haiku"), ("marx", "policy"), ("buffett", "recommend")]


@pytest.fixture(autouse=True)
def offline_env(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_ENTITY",
                "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_JOB_TYPE", "LAC_DEBUG"):
        monkeypatch.delenv(var, raising=False)  # runs land in the job dir unless a test sets WANDB_DIR
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    (tmp_path / "home").mkdir()


def tcfg(**kw):
    base = {"name": "wandb", "project": "lac-test", "entity": None, "group": "test-sweep",
            "job_type": "kl", "tags": ["unit"], "mode": None}
    return OmegaConf.create({**base, **kw})


def job_config(layer=(6, 10), site="p_last"):
    """A resolved job config shaped like conf/config.yaml's."""
    return {
        "model": {"name": "qwen0.5", "id": "embedded/Qwen2.5-Coder-0.5B-Instruct-gguf-1d9614638d18",
                  "n_layers": 24, "paper_layers": [6, 10, 13, 17, 20], "long_layers": [6, 13, 17]},
        "grid": {"name": "short", "path": None,
                 "personas": {"yoda": "Yoda", "marx": "Karl Marx", "buffett": "Warren Buffett"}},
        "site": {"name": site, "sites": [site]},
        "intervention": {"name": "additive", "layers": None},
        "tracker": dict(tcfg()),
        "mode": "kl",
        "layer": list(layer) if len(layer) > 1 else layer[0],
        "geometry_layers": None,
        "sweep": "test-sweep",
    }


def results_df(layers=(6, 10), seed=0):
    """kl rows for 3 cells x len(layers) layers (additive, p_last), plus geometry rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for persona, task in CELLS:
        base = dict(model="qwen0.5", model_id="embedded/q", grid="short", cell=f"{persona}__{task}",
                    persona=persona, task=task, site="p_last")
        for layer in layers:
            rows.append({**base, "layer": layer, "layers": str(layer), "intervention": "additive",
                         "metric": "kl", "value": float(rng.gamma(2.0, 0.1))})
            for metric in GEOMETRY_METRICS:
                rows.append({**base, "layer": layer, "layers": str(layer), "intervention": "decomposition",
                             "metric": metric, "value": float(rng.uniform(-1, 1))})
    return frame(rows)


def native_rows(df):
    return [[_nan_free(v.item() if hasattr(v, "item") else v) for v in row]
            for row in df.itertuples(index=False, name=None)]


def _nan_free(v):
    """NaN (alpha of rows without a dose) as a comparable marker: nan != nan in list equality."""
    return "NaN" if isinstance(v, float) and v != v else v


def logged(rows):
    return [[_nan_free(v) for v in row] for row in rows]


# --------------------------------------------------------------------------- end to end, offline


def test_offline_run_holds_config_summary_and_results_table(tmp_path):
    df = results_df()
    summary = summarize(df)
    t0 = time.monotonic()
    tr = start_tracker(tcfg(), run_id=run_id_for("0123456789abcdef", tcfg()), config=job_config(),
                       run_dir=tmp_path / "job", name="qwen0.5-p_last-L6,10")
    tr.log_results(df, summary)
    tr.finish()
    tr.finish()  # idempotent
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"offline init+log+finish took {elapsed:.1f}s"

    assert tr.mode == "offline"
    (sync_dir,) = find_runs(tmp_path / "job")
    assert Path(tr.url_or_dir) == sync_dir
    run = read_run(sync_dir)

    assert run.run["id"] == run_id_for("0123456789abcdef", tcfg())
    assert run.run["project"] == "lac-test" and run.run["group"] == "test-sweep"
    assert run.run["job_type"] == "kl" and run.run["tags"] == ["unit"]
    assert run.exit_code == 0

    cfg = run.config
    assert cfg["model"] == "qwen0.5"
    assert cfg["model_id"] == "embedded/Qwen2.5-Coder-0.5B-Instruct-gguf-1d9614638d18"
    assert cfg["grid"] == "short"
    assert cfg["site"] == "p_last" and cfg["sites"] == "p_last"
    assert cfg["layer"] == [6, 10] and cfg["layers"] == "6,10"
    assert cfg["intervention"] == "additive"
    assert cfg["model/paper_layers"] == [6, 10, 13, 17, 20]
    assert cfg["grid/personas/yoda"] == "Yoda"
    assert cfg["tracker/group"] == "test-sweep"

    kl6 = df[(df.metric == "kl") & (df.layer == 6) & (df.site == "p_last") & (df.intervention == "additive")]
    assert len(kl6) == 3
    assert run.summary["kl/p_last/L6/additive/median"] == np.median(kl6.value.to_numpy())
    kl10 = df[(df.metric == "kl") & (df.layer == 10)]
    assert run.summary["kl/p_last/L10/additive/p75"] == np.percentile(kl10.value.to_numpy(), 75)
    for k, v in summary_keys(summary).items():
        assert run.summary[k] == v, k
    assert "kl/p_last/additive/median" not in run.summary  # two layers: no layer-free key

    table = run.tables["results"]
    assert table["columns"] == list(df.columns)
    assert logged(table["data"]) == native_rows(df)


def test_single_layer_job_gets_layer_free_keys(tmp_path):
    df = results_df(layers=(6,), seed=3)
    tr = start_tracker(tcfg(), run_id=run_id_for("aaaa", tcfg()), config=job_config(layer=(6,)),
                       run_dir=tmp_path / "job", name="one-layer")
    tr.log_results(df, summarize(df))
    tr.finish()
    run = read_run(find_runs(tmp_path / "job")[0])
    assert run.config["layer"] == 6 and run.config["layers"] == "6"
    kl = df[df.metric == "kl"].value.to_numpy()
    assert run.summary["kl/p_last/additive/median"] == np.median(kl)
    assert run.summary["kl/p_last/additive/median"] == run.summary["kl/p_last/L6/additive/median"]
    cos = df[df.metric == "cos_xy_sum"].value.to_numpy()
    assert run.summary["cos_xy_sum/p_last/median"] == np.median(cos)


def test_two_runs_in_one_process_get_their_own_dirs_and_ids(tmp_path):
    dirs, ids = [], []
    for i, key in enumerate(("1111111111111111", "2222222222222222")):
        df = results_df(seed=i)
        rid = run_id_for(key, tcfg())
        tr = start_tracker(tcfg(), run_id=rid, config=job_config(), run_dir=tmp_path / f"job{i}",
                           name=f"job{i}")
        tr.log_results(df, summarize(df))
        tr.finish()
        (sync_dir,) = find_runs(tmp_path / f"job{i}")
        run = read_run(sync_dir)
        assert run.run["id"] == rid and run.exit_code == 0
        kl6 = df[(df.metric == "kl") & (df.layer == 6)].value.to_numpy()
        assert run.summary["kl/p_last/L6/additive/median"] == np.median(kl6)
        dirs.append(sync_dir)
        ids.append(rid)
    assert dirs[0] != dirs[1] and ids[0] != ids[1]
    assert logged(read_run(dirs[0]).tables["results"]["data"]) == native_rows(results_df(seed=0))
    assert logged(read_run(dirs[1]).tables["results"]["data"]) == native_rows(results_df(seed=1))


def test_large_results_table_is_not_cut_at_10000_rows(tmp_path):
    rows = [dict(model="m", model_id="m", grid="g", cell=f"p{i}__t", persona=f"p{i}", task="t",
                 site="g1", layer=3, layers="3", intervention="additive", metric="kl", value=i / 7)
            for i in range(12_000)]
    df = frame(rows)
    tr = start_tracker(tcfg(), run_id="lac-large", config=job_config(), run_dir=tmp_path, name="large")
    tr.log_results(df, summarize(df))
    tr.finish()
    table = read_run(find_runs(tmp_path)[0]).tables["results"]
    assert len(table["data"]) == 12_000
    assert logged(table["data"])[-1] == native_rows(df.tail(1))[0]


def test_generations_table(tmp_path):
    records = [
        {"cell": "yoda__haiku", "persona": "yoda", "task": "haiku", "condition": "additive",
         "text": "Monday, hmm.", "marker_any": 1.0, "marker_distinct": 2.0, "hits": ["hmm", "young one"]},
        {"cell": "marx__policy", "persona": "marx", "task": "policy", "condition": "bare",
         "text": "UBI is ...", "marker_any": 0.0, "marker_distinct": 0.0, "hits": []},
    ]
    tr = start_tracker(tcfg(job_type="markers"), run_id="lac-gen", config=job_config(layer=(14,)),
                       run_dir=tmp_path, name="gen")
    tr.log_generations(records)
    tr.finish()
    table = read_run(find_runs(tmp_path)[0]).tables["generations"]
    assert table["columns"] == ["cell", "persona", "task", "condition", "text",
                                "marker_any", "marker_distinct", "hits"]
    assert table["data"] == [
        ["yoda__haiku", "yoda", "haiku", "additive", "Monday, hmm.", 1.0, 2.0, "hmm, young one"],
        ["marx__policy", "marx", "policy", "bare", "UBI is ...", 0.0, 0.0, ""],
    ]


# --------------------------------------------------------------------------- ids, keys, config


def test_run_id_is_deterministic_per_key_and_group():
    a = run_id_for("0123456789abcdef", tcfg())
    assert a == run_id_for("0123456789abcdef", tcfg())
    assert a.startswith("lac-0123456789abcdef")
    assert a != run_id_for("fedcba9876543210", tcfg())
    assert a != run_id_for("0123456789abcdef", tcfg(group="another-sweep"))
    odd = run_id_for("not/a valid:id", tcfg())
    assert odd == run_id_for("not/a valid:id", tcfg())
    assert all(c.isalnum() or c in "-_" for c in odd)


def test_layer_free_keys_only_for_one_layer():
    assert layer_free_keys(summarize(results_df(layers=(6, 10)))) == {}
    one = layer_free_keys(summarize(results_df(layers=(10,))))
    assert set(one) >= {"kl/p_last/additive/median", "kl/p_last/additive/p25", "cos_x_y/p_last/median"}


def test_group_keys_resolve_named_and_multi_layer_sets():
    cfg = job_config()
    cfg["layer"] = "paper"
    assert tracking.group_keys(cfg)["layer"] == [6, 10, 13, 17, 20]
    cfg["intervention"]["layers"] = [14, 10, 12]
    keys = tracking.group_keys(cfg)
    assert keys["layer"] == 14 and keys["layers"] == "10,12,14"
    flat = tracking.run_config(cfg)
    assert flat["layer_requested"] == "paper" and flat["layer"] == 14


# --------------------------------------------------------------------------- check_tracker / mode


def test_unknown_tracker_name_is_refused_with_the_allowed_ones():
    with pytest.raises(TrackerError) as e:
        check_tracker(tcfg(name="mlflow"))
    assert "mlflow" in str(e.value) and "wandb" in str(e.value) and "none" in str(e.value)


def test_unknown_mode_is_refused():
    with pytest.raises(TrackerError, match="tracker.mode='cloud'"):
        check_tracker(tcfg(mode="cloud"))
    check_tracker(tcfg(mode="offline"))
    check_tracker(tcfg(mode="disabled"))


def test_online_without_api_key_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    t0 = time.monotonic()
    with pytest.raises(TrackerError) as e:
        check_tracker(tcfg(mode="online"))
    with pytest.raises(TrackerError):  # start_tracker checks first: no wandb.init, no network
        start_tracker(tcfg(mode="online"), run_id="lac-x", config={}, run_dir=tmp_path, name="x")
    assert time.monotonic() - t0 < 2.0
    msg = str(e.value)
    assert "WANDB_API_KEY" in msg and "tracker.mode=offline" in msg
    assert not (tmp_path / "wandb").exists()


def test_online_with_netrc_entry_passes_check(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    rc = tmp_path / "home" / ".netrc"
    rc.write_text("machine 127.0.0.1:9\n  login user\n  password " + "k" * 40 + "\n")
    rc.chmod(0o600)
    check_tracker(tcfg(mode="online"))
    assert resolve_mode(tcfg()) == "online"  # mode null, no WANDB_MODE, a key: online
    rc.unlink()
    assert resolve_mode(tcfg()) == "offline"  # ... without a key: offline


def test_resolve_mode_precedence(monkeypatch):
    assert resolve_mode(tcfg(mode="disabled")) == "disabled"  # tracker.mode beats WANDB_MODE
    assert resolve_mode(tcfg()) == "offline"  # WANDB_MODE=offline (fixture)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_mode(tcfg()) == "online"
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode(tcfg()) == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode(tcfg()) == "offline"


# --------------------------------------------------------------------------- tracker=none


def test_none_tracker_does_nothing_and_never_imports_wandb(tmp_path):
    tr = start_tracker(tcfg(name="none"), run_id="x", config={}, run_dir=tmp_path / "job", name="x")
    assert isinstance(tr, NoTracker)
    tr.log_results(results_df(), {})
    tr.log_generations([])
    tr.finish()
    assert not (tmp_path / "job").exists()

    code = (
        "import sys, lac.tracking as t\n"
        "print('wandb' in sys.modules)\n"
        "tr = t.start_tracker({'name': 'none'}, run_id='x', config={}, run_dir='unused', name='x')\n"
        "tr.log_results(None, {}); tr.finish()\n"
        "print(type(tr).__name__, 'wandb' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "NoTracker", "False"]


# --------------------------------------------------------------------------- W&B conventions, history


def test_wandb_dir_set_by_the_user_wins_over_the_job_dir(tmp_path, monkeypatch):
    wdir = tmp_path / "user_wandb_dir"
    monkeypatch.setenv("WANDB_DIR", str(wdir))
    df = results_df(layers=(6,))
    tr = start_tracker(tcfg(), run_id="lac-wdir", config=job_config(layer=(6,)), run_dir=tmp_path / "job",
                       name="wdir")
    tr.log_results(df, summarize(df))
    tr.finish()
    (sync_dir,) = find_runs(wdir)
    assert sync_dir.parent == wdir / "wandb" and Path(tr.url_or_dir) == sync_dir
    assert not find_runs(tmp_path / "job")
    assert read_run(sync_dir).exit_code == 0


def test_wandb_env_project_entity_group_tags_win(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-group")
    monkeypatch.setenv("WANDB_TAGS", "a, b")
    monkeypatch.setenv("WANDB_JOB_TYPE", "env-type")
    assert tracking.wandb_settings(tcfg()) == {"project": "env-project", "entity": None, "group": "env-group",
                                               "job_type": "env-type", "tags": ["a", "b"]}
    rid = run_id_for("0123456789abcdef", tcfg())
    assert rid == run_id_for("0123456789abcdef", tcfg(group="env-group"))  # the id follows the run's group
    tr = start_tracker(tcfg(), run_id=rid, config=job_config(), run_dir=tmp_path / "job", name="env")
    tr.finish()
    run = read_run(find_runs(tmp_path / "job")[0])
    assert run.run["project"] == "env-project" and run.run["group"] == "env-group"
    assert run.run["tags"] == ["a", "b"] and run.run["job_type"] == "env-type"
    monkeypatch.setenv("WANDB_ENTITY", "env-entity")
    assert tracking.wandb_settings(tcfg(entity="cfg-entity"))["entity"] == "env-entity"


def _history(run):
    return {int(r["layer"]): {k: v for k, v in r.items() if k.startswith("by_layer/") or k == "layer_frac"}
            for r in run.history if "layer" in r}


def test_multi_layer_job_and_layer_sweep_log_the_same_history(tmp_path):
    """Per-layer history rows with `layer` as their step: one job over layers 6, 10 draws the same
    curve as two one-layer jobs; `layer_frac` = layer / n_layers for cross-model x axes."""
    df = results_df(layers=(6, 10), seed=4)
    tr = start_tracker(tcfg(), run_id="lac-multi", config=job_config(), run_dir=tmp_path / "multi", name="m")
    tr.log_results(df, summarize(df))
    tr.finish()
    multi = _history(read_run(find_runs(tmp_path / "multi")[0]))
    swept = {}
    for L in (6, 10):
        part = df[df.layer == L].reset_index(drop=True)
        tr = start_tracker(tcfg(), run_id=f"lac-L{L}", config=job_config(layer=(L,)),
                           run_dir=tmp_path / f"L{L}", name=f"L{L}")
        tr.log_results(part, summarize(part))
        tr.finish()
        swept.update(_history(read_run(find_runs(tmp_path / f"L{L}")[0])))
    assert multi == swept and sorted(multi) == [6, 10]
    kl6 = df[(df.metric == "kl") & (df.layer == 6)].value.to_numpy()
    assert multi[6]["by_layer/kl/p_last/additive/median"] == np.median(kl6)
    assert multi[10]["layer_frac"] == 10 / 24
    cos = df[(df.metric == "cos_xy_sum") & (df.layer == 10)].value.to_numpy()
    assert multi[10]["by_layer/cos_xy_sum/p_last/p75"] == np.percentile(cos, 75)


def test_group_keys_of_layer_set_sweeps():
    cfg = job_config()
    cfg["model"]["layer_sets"] = {"single": [13], "m3": [9, 11, 13]}
    cfg["layer"] = "m3"  # layer=m3: three one-layer jobs' layers in one job
    keys = tracking.group_keys(cfg)
    assert keys["layer"] == [9, 11, 13] and keys["layers"] == "9,11,13" and keys["n_layers"] == 24
    cfg["layer"] = "single"  # +sweep=paper_table4: layer=single, intervention.layers=m3
    cfg["intervention"] = {"name": "host_additive", "layers": "m3"}
    keys = tracking.group_keys(cfg)
    assert keys["layer"] == 13 and keys["layers"] == "9,11,13"
    cfg["intervention"] = {"name": "host_none", "layers": None}
    assert tracking.group_keys(cfg)["layer"] == 13


def test_track_logs_one_run_per_group_also_for_reused_results(tmp_path):
    """runner._track: a finished job reused by a second sweep (another group) gets a run in that
    group; tracking the same job again in a group it has a run in adds none."""
    import json as _json

    from lac.results import JobStore
    from lac.runner import _track

    df = results_df(layers=(6,))
    store = JobStore(tmp_path / "results", "0123456789abcdef")
    store.claim({})
    store.finish(df, {"summary": summarize(df), "seconds": 1.0}, [])
    cfgs = {g: OmegaConf.create({"tracker": dict(tcfg(group=g))}) for g in ("sweep-a", "sweep-b")}
    for g in ("sweep-a", "sweep-b", "sweep-a"):
        _track(cfgs[g], store, run_id_for(store.key, cfgs[g].tracker), tmp_path / f"job-{g}", "j", job_config((6,)))
    runs = [read_run(d) for d in find_runs(tmp_path)]
    assert sorted(r.run["group"] for r in runs) == ["sweep-a", "sweep-b"]
    assert all(r.summary["kl/p_last/additive/median"] == np.median(df[df.metric == "kl"].value) for r in runs)
    marks = sorted(p.name for p in (store.dir / "tracked").glob("*.json"))
    assert marks == sorted(f"{run_id_for(store.key, c.tracker)}.json" for c in cfgs.values())
    assert _json.loads((store.dir / "tracked" / marks[0]).read_text())["where"]


def test_configure_logging_quiets_lightning_unless_verbose(monkeypatch):
    import logging
    import warnings

    with warnings.catch_warnings():
        assert tracking.configure_logging(False) is False
        assert logging.getLogger("lightning.pytorch").level == logging.WARNING
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
        assert not caught
        monkeypatch.setenv("LAC_DEBUG", "1")
        assert tracking.configure_logging(False) is True
        assert tracking.configure_logging(["lac"]) is True
    monkeypatch.delenv("LAC_DEBUG")
    assert tracking.verbose_requested(False) is False and tracking.verbose_requested(True) is True


LIGHTNING_RACE = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from lac import runner, tracking
tracking.configure_logging(False)
runner._import_in_background("pandas", "lightning.pytorch")
runner._imported()
import lightning as L
opts = tracking.trainer_options(1)
assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.WARNING
L.Trainer(accelerator="cpu", devices=1, **opts)
"""


def test_lightning_imported_in_the_background_stays_quiet():
    """The job imports Lightning in a thread beside its clean captures; once those took milliseconds
    (traces read from disk) the main thread reached `import lightning` mid-import and Lightning's
    half-run __init__ set its log level back to INFO after lac had quieted it ("GPU available",
    "litlogger" tips on the console). `_imported()` waits for the thread first."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", LIGHTNING_RACE], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "litlogger" not in r.stderr and "GPU available" not in r.stderr, r.stderr[-3000:]


# --------------------------------------------------------------------------- controls and mechanism


def controls_df(n_layers=24, starts=(10, 12), seed=7):
    """kv_persona "from L" sets (layers L..n_layers-1, `layer` = the deepest), host_none_lm (no layer),
    host_oracle_lm at single layers, and attention rows (every metric) at every layer, p_last."""
    from lac.schema import ATTENTION, ATTENTION_METRICS

    rng = np.random.default_rng(seed)
    rows = []
    for persona, task in CELLS:
        base = dict(model="qwen0.5", model_id="embedded/q", grid="long", cell=f"{persona}__{task}",
                    persona=persona, task=task, site="p_last")
        rows.append({**base, "layer": -1, "layers": "", "intervention": "host_none_lm", "metric": "kl",
                     "value": float(rng.gamma(2.0, 1.0))})
        for L in starts:
            rows.append({**base, "layer": n_layers - 1, "layers": ",".join(map(str, range(L, n_layers))),
                         "intervention": "kv_persona", "metric": "kl", "value": float(rng.gamma(2.0, 0.1))})
            rows.append({**base, "layer": L, "layers": str(L), "intervention": "host_oracle_lm", "metric": "kl",
                         "value": float(rng.gamma(2.0, 0.5))})
        for L in range(n_layers):
            rows += [{**base, "layer": L, "layers": str(L), "intervention": ATTENTION, "metric": m,
                      "value": float(rng.uniform(0, 1))} for m in ATTENTION_METRICS]
    return frame(rows)


def test_from_layer_is_the_first_layer_of_a_set_ending_at_the_last_layer():
    assert tracking.from_layer("10,11,12,13", 14) == 10
    assert tracking.from_layer("10,11,12,13", 24) is None  # not L..n-1
    assert tracking.from_layer("10,11,12,13") == 10  # depth unknown: consecutive is enough
    assert tracking.from_layer("6,8,10") is None and tracking.from_layer("13", 14) is None
    assert tracking.from_layer("") is None


def test_attention_and_from_sets_reach_summary_keys_and_history():
    df = controls_df()
    s = summarize(df)
    keys = summary_keys(s)
    att = df[(df.metric == "attn_persona") & (df.layer == 5)].value.to_numpy()
    assert keys["attn_persona/p_last/L5/median"] == np.median(att)
    assert keys["attn_persona/p_last/L5/p25"] == np.percentile(att, 25)
    for m in ("attn_persona_max", "attn_persona_window", "attn_persona_window_max"):
        assert {f"{m}/p_last/L{L}/median" for L in range(24)} <= set(keys), m
    from_set = ",".join(map(str, range(10, 24)))
    kv = df[(df.intervention == "kv_persona") & (df.layers == from_set)].value.to_numpy()
    assert keys[f"kl/p_last/L{from_set.replace(',', '+')}/kv_persona/median"] == np.median(kv)
    assert keys["kl/p_last/none/host_none_lm/median"] == np.median(df[df.intervention == "host_none_lm"].value)

    rows = {r["layer"]: r for r in tracking.history_rows(s, n_layers=24)}
    assert sorted(rows) == list(range(24))
    # a from-L set is the point x = L (its first layer) of the kv_persona_from curve, not x = 23
    assert rows[10]["by_layer/kl/p_last/kv_persona_from/median"] == np.median(kv)
    assert {L for L, r in rows.items() if "by_layer/kl/p_last/kv_persona_from/median" in r} == {10, 12}
    assert "by_layer/kl/p_last/kv_persona/median" not in rows[23]
    assert rows[12]["by_layer/kl/p_last/host_oracle_lm/median"] == np.median(
        df[(df.intervention == "host_oracle_lm") & (df.layer == 12)].value)
    assert rows[5]["by_layer/attn_persona_window/p_last/median"] == np.median(
        df[(df.metric == "attn_persona_window") & (df.layer == 5)].value)
    assert not any("host_none_lm" in k for r in rows.values() for k in r)  # no layer: summary keys only
    # a single layer at n-1 is also "from n-1" when the job has from-L sets of that intervention
    last = df[(df.intervention == "kv_persona") & (df.layers == from_set)].assign(layers="23")
    rows = {r["layer"]: r for r in tracking.history_rows(summarize(pd.concat([df, last])), n_layers=24)}
    assert rows[23]["by_layer/kl/p_last/kv_persona_from/median"] == np.median(kv)
    # the console table folds the set
    from lac.results import format_table

    table = format_table(s)
    assert "10..23" in table and "attn_persona median" in table


def test_offline_run_logs_attention_and_from_curves(tmp_path):
    df = controls_df(starts=(10,))
    cfg = job_config(layer=(10,))
    cfg["intervention"] = {"name": "kv_persona", "layers": "from"}
    tr = start_tracker(tcfg(), run_id="lac-controls", config=cfg, run_dir=tmp_path / "job", name="controls")
    tr.log_results(df, summarize(df))
    tr.finish()
    run = read_run(find_runs(tmp_path / "job")[0])
    hist = _history(run)
    kv = df[df.intervention == "kv_persona"].value.to_numpy()
    assert hist[10]["by_layer/kl/p_last/kv_persona_from/median"] == np.median(kv)
    att = df[(df.metric == "attn_persona") & (df.layer == 3)].value.to_numpy()
    assert hist[3]["by_layer/attn_persona/p_last/median"] == np.median(att)
    assert run.summary["attn_persona/p_last/L3/median"] == np.median(att)
    assert run.config["intervention"] == "kv_persona" and run.config["layer"] == 10


# --------------------------------------------------------------------------- the run in its own process


def _run_of(root: Path):
    (sync_dir,) = find_runs(root)
    return read_run(sync_dir)


def test_run_in_its_own_process_equals_the_in_process_run(tmp_path, caplog):
    """lac.tracker_process: the child logs the same config, summary, history and tables as
    start_tracker in this process, in a process of its own, and its log lines reach ours."""
    from lac.tracker_process import RemoteTracker

    df, summary, rid = results_df(), summarize(results_df()), run_id_for("0123456789abcdef", tcfg())
    here = start_tracker(tcfg(), run_id=rid, config=job_config(), run_dir=tmp_path / "here", name="j")
    here.log_results(df, summary)
    here.finish()
    remote = RemoteTracker()
    assert remote._proc.pid != os.getpid()
    remote.begin(tcfg(), run_id=rid, config=job_config(), run_dir=tmp_path / "child", name="j")
    with caplog.at_level("INFO", logger="lac.tracking"):
        assert remote.result() is remote and remote.mode == "offline"
        remote.log_results(df, summary)
        remote.finish()
        remote.finish()  # idempotent
    assert remote._proc.poll() is None and lac.tracker_process._spare.proc is remote._proc  # kept for a next job
    assert Path(remote.url_or_dir) == find_runs(tmp_path / "child")[0]
    assert remote.sync_command == f"wandb sync {remote.url_or_dir}"
    assert any("W&B offline run finished" in r.getMessage() and remote.url_or_dir in r.getMessage()
               for r in caplog.records)  # the child's line, logged here
    a, b = _run_of(tmp_path / "here"), _run_of(tmp_path / "child")
    assert b.exit_code == 0 and b.run["id"] == a.run["id"] == rid
    assert b.config == a.config
    numbers = [k for k, v in a.summary.items() if not k.startswith("_") and not isinstance(v, dict)]
    assert len(numbers) > 20 and {k: b.summary[k] for k in numbers} == {k: a.summary[k] for k in numbers}
    assert set(b.summary) == set(a.summary)  # and the same tables (their artifact paths differ)
    same = ("columns", "data")
    assert {k: b.tables["results"][k] for k in same} == {k: a.tables["results"][k] for k in same}
    assert logged(b.tables["results"]["data"]) == native_rows(df)
    assert len(_history(a)) == 2 and _history(b) == _history(a)  # the per-layer curves


def test_a_child_never_asked_for_a_run_leaves_none(tmp_path):
    """A job refused by its checks, or ended before its run began: the child waits for the next job
    (or exits once let go) and no run exists."""
    from lac.tracker_process import RemoteTracker

    remote = RemoteTracker()
    remote.release()  # what a job that failed before its checks passed does
    assert lac.tracker_process._spare.proc is remote._proc and remote._proc.poll() is None
    lac.tracker_process.shutdown()
    assert remote._proc.wait(timeout=60) == 0 and lac.tracker_process._spare is None
    remote = RemoteTracker()
    remote.close()
    assert remote._proc.returncode == 0
    assert not find_runs(tmp_path)


def test_a_multiruns_later_jobs_reuse_the_child(tmp_path, monkeypatch):
    """Jobs of one process share one child: the second job's run goes to the first job's child
    (no new import, no new wandb-core), with the second job's own environment and working
    directory, and both runs are whole (config, summary, table, exit code 0)."""
    from lac.tracker_process import RemoteTracker

    lac.tracker_process.shutdown()
    df = results_df()
    summary = summarize(df)
    first = RemoteTracker()
    id_one = run_id_for("job-one", tcfg())
    first.begin(tcfg(), run_id=id_one, config=job_config(), run_dir=tmp_path / "one", name="a")
    first.log_results(df, summary)
    first.finish()
    assert first._proc.poll() is None
    monkeypatch.setenv("WANDB_RUN_GROUP", "second-group")  # a job's own W&B variables (hydra.job.env_set)
    monkeypatch.chdir(tmp_path)
    second = RemoteTracker()
    assert second._proc is first._proc and lac.tracker_process._spare is None
    first.release()  # late, twice: the child now serves the second job and stays with it
    first.finish()
    assert lac.tracker_process._spare is None and not second._conn.closed
    id_two = run_id_for("job-two", tcfg())  # its group's hash: the second group's
    second.begin(tcfg(), run_id=id_two, config=job_config(layer=(6,)),
                 run_dir=Path("two"), name="b")  # relative: the job's working directory, not the child's
    second.result()
    second.log_results(df, summary)
    second.finish(exit_code=0)
    assert Path(second.url_or_dir).resolve() == find_runs(tmp_path / "two")[0].resolve()
    one, two = _run_of(tmp_path / "one"), _run_of(tmp_path / "two")
    assert one.exit_code == 0 and two.exit_code == 0
    assert one.run["id"] == id_one and two.run["id"] == id_two
    assert two.run["group"] == "second-group" and one.run["group"] != "second-group"
    assert one.config["layer"] != two.config["layer"] == 6
    assert logged(two.tables["results"]["data"]) == native_rows(df)
    numbers = [k for k, v in one.summary.items() if not k.startswith("_") and not isinstance(v, dict)]
    assert len(numbers) > 20 and {k: two.summary[k] for k in numbers} == {k: one.summary[k] for k in numbers}
    lac.tracker_process.shutdown()
    assert second._proc.wait(timeout=60) == 0
    assert len(find_runs(tmp_path)) == 2


def test_when_the_jobs_process_goes_away_its_run_ends_as_failed(tmp_path):
    """The child sees the connection close without a finish (the job's process was killed): it
    finishes the run with exit code 1 instead of leaving it open."""
    import signal

    from lac.tracker_process import RemoteTracker

    remote = RemoteTracker()
    remote.begin(tcfg(), run_id=run_id_for("dead", tcfg()), config=job_config(), run_dir=tmp_path, name="j")
    remote.result()
    remote.log_results(results_df(), summarize(results_df()))
    os.kill(remote._proc.pid, signal.SIGINT)  # Ctrl-C reaches the child too: it leaves the ending to us
    time.sleep(0.5)
    assert remote._proc.poll() is None
    remote._conn.close()  # what the child sees when our process dies
    assert remote._proc.wait(timeout=120) == 0
    run = _run_of(tmp_path)
    assert run.exit_code == 1 and "results" in run.tables


def test_a_w_and_b_process_killed_mid_run_is_one_tracker_error_naming_what_is_kept(tmp_path):
    """A SIGTERM to the job's group (`timeout`) leaves the child running for the job to end; a child
    killed outright (SIGKILL, the OOM killer) is a TrackerError, not a BrokenPipeError traceback, and
    the job's end says its results are kept, its run not marked logged (the next run logs it)."""
    import signal

    from lac.results import JobStore
    from lac.runner import _track
    from lac.tracker_process import RemoteTracker

    remote = RemoteTracker()
    remote.begin(tcfg(), run_id=run_id_for("killed", tcfg()), config=job_config(), run_dir=tmp_path, name="j")
    remote.result()
    os.kill(remote._proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert remote._proc.poll() is None
    os.kill(remote._proc.pid, signal.SIGKILL)
    remote._proc.wait(timeout=60)
    with pytest.raises(TrackerError, match=r"the W&B process ended before it answered \(exit code -9\)"):
        remote.log_results(results_df(), summarize(results_df()))
    remote.finish(exit_code=1)  # already let go: nothing to finish, nothing raised

    store = JobStore(tmp_path / "store", "k")
    store.claim(job_config())
    store.finish(results_df(), {"summary": summarize(results_df())}, [])

    class Dead:  # the job's run, begun early, whose process has died since
        mode = "offline"

        def result(self):
            return self

        def log_results(self, df, summary):
            raise TrackerError("the W&B process ended before it answered (exit code -9)")

        def finish(self, exit_code=None):
            pass

    with pytest.raises(TrackerError, match=r"exit code -9\); the job's results are kept in .*store/k, and the "
                                           r"same command logs its W&B run"):
        _track(OmegaConf.create({"tracker": tcfg()}), store, "lac-k", tmp_path, "j", job_config(), Dead())
    assert not store.tracked("lac-k")


def test_a_hung_w_and_b_process_is_stopped_not_waited_on_for_ever(tmp_path, monkeypatch):
    """A child that stops answering (a wandb finish stuck past its own finish_timeout; here SIGSTOP)
    is killed after tracker.finish_timeout plus a grace period, and the job gets one TrackerError."""
    import signal

    from lac.tracker_process import RemoteTracker

    monkeypatch.setattr(lac.tracker_process, "_GRACE", 1.0)
    remote = RemoteTracker()
    remote.begin(tcfg(finish_timeout=1), run_id=run_id_for("hung", tcfg()), config=job_config(),
                 run_dir=tmp_path, name="j")
    remote.result()
    os.kill(remote._proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(TrackerError, match=r"did not answer within 2 s \(tracker.finish_timeout=1 plus 1 s\) "
                                           r"and was stopped"):
        remote.log_results(results_df(), summarize(results_df()))
    assert 1.5 < time.monotonic() - t0 < 30
    assert remote._proc.poll() == -signal.SIGKILL
    remote.finish(exit_code=1)  # let go already: nothing to finish, nothing raised
    assert lac.tracker_process._spare is None or lac.tracker_process._spare.proc is not remote._proc


def test_a_run_the_child_cannot_start_is_a_tracker_error_here(tmp_path, monkeypatch):
    """start_tracker's own error (here: online without an API key) comes back as a TrackerError
    naming it; the child has exited and finishing it afterwards does nothing."""
    from lac.tracker_process import RemoteTracker

    monkeypatch.setenv("WANDB_MODE", "online")
    remote = RemoteTracker()
    remote.begin(tcfg(mode="online"), run_id="lac-x", config=job_config(), run_dir=tmp_path, name="j")
    with pytest.raises(TrackerError, match="no W&B API key"):
        remote.result()
    assert remote._proc.returncode == 1
    remote.finish(exit_code=1)  # what a failing job does next: nothing left to finish
    assert not find_runs(tmp_path)


def test_tracker_process_must_be_a_bool():
    with pytest.raises(TrackerError, match=r"tracker.process must be true or false.*'yes'"):
        check_tracker(tcfg(process="yes"))
    check_tracker(tcfg(process=False))
    assert tracking.use_process(tcfg()) == (sys.platform != "win32")
    assert not tracking.use_process(tcfg(process=False)) and not tracking.use_process({"name": "none"})


def test_a_forked_process_does_not_take_its_parents_child():
    """A kept child belongs to the process that kept it: a process forked from it (a launcher's
    worker) spawns its own instead of sharing, or closing, the parent's connection."""
    from lac.tracker_process import RemoteTracker

    lac.tracker_process.shutdown()
    first = RemoteTracker()
    first.release()
    kept = lac.tracker_process._spare
    conn, proc = kept.conn, kept.proc
    lac.tracker_process._spare = kept._replace(pid=kept.pid + 1)  # what a forked process sees
    try:
        second = RemoteTracker()
        assert second._proc is not proc and proc.poll() is None and not conn.closed
        second.close()
        assert second._proc.returncode == 0
    finally:
        lac.tracker_process._spare = kept
        lac.tracker_process.shutdown()
    assert proc.returncode == 0


# --------------------------------------------------------------------------- nothing left behind

LEAVE_SCRIPT = """
import sys
from pathlib import Path

from test_tracking import job_config, results_df, tcfg

from lac.leave import exit_now
from lac.results import summarize
from lac.tracking import run_id_for, start_tracker

where, run_dir, leave = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
kw = dict(run_id=run_id_for("0123456789abcdef", tcfg()), config=job_config(), run_dir=run_dir, name="j")
if where == "process":
    from lac.tracker_process import RemoteTracker

    tracker = RemoteTracker()
    tracker.begin(tcfg(), **kw)
    tracker.result()
else:
    tracker = start_tracker(tcfg(), **kw)
df = results_df()
tracker.log_results(df, summarize(df))
tracker.finish()
if leave == "exit_now":
    exit_now(0)  # as `python -m lac.run` leaves
"""  # else Python's own exit, as a script, a notebook or a submitit job leaves


@pytest.mark.parametrize("leave", ["exit_now", "python"])
@pytest.mark.parametrize("where", ["process", "thread"])
def test_a_finished_job_leaves_no_process_behind(tmp_path, where, leave):
    """lac.leave: `python -m lac.run` leaves by os._exit; its W&B child (tracker.process) or
    wandb-core (the thread) is stopped and waited for first, and at Python's own exit the kept
    child is too (atexit), so a PID 1 that never reaps (a container without an init) is left no
    zombies (before: the child and wandb-core, or wandb-core)."""
    from subreaper import command, leftovers

    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}
    out = subprocess.run(command(sys.executable, "-c", LEAVE_SCRIPT, where, str(tmp_path / "run"), leave),
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert leftovers(out.stdout) == []
    (run,) = find_runs(tmp_path / "run")
    assert read_run(run).exit_code == 0  # the run itself is whole


def test_the_patched_steps_bar_counts_cells_from_its_first_line(capfd):
    """LAC_PROGRESS=1: Lightning's predict bar shows lac's description and counts cells (12 here, in
    batches of 5) from its first line, with no `Predicting: 0/?` or per-dataloader batch bar first."""
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader

    class Cells(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            return {"rows": [0] * 3 * len(batch)}

    bar = tracking.progress_callback(12, enabled=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar])
    with warnings.catch_warnings():  # Lightning's own deprecation warnings, quiet as in a job
        tracking.quiet_job_warnings()
        trainer.predict(Cells(), DataLoader(list(range(12)), batch_size=5, collate_fn=list), return_predictions=False)
    shown = [s.strip() for s in capfd.readouterr().out.replace("\r", "\n").splitlines() if s.strip()]
    assert shown and all(s.startswith("lac: cells captured and patched:") for s in shown), shown
    assert "12/12" in shown[-1] and "cell/s" in shown[-1] and "rows=36" in shown[-1]
    assert tracking._PREDICT.pop("cells") == 12
    tracking._PREDICT.clear()

"""A multirun captures once as deep as its deepest job needs (issue 14: `-m layer=range(4,14)` must not
re-capture one layer deeper in every job)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lac import runner
from lac.config import build_spec
from tests.conftest import compose


def test_jobs_of_a_planned_sweep_capture_to_the_sweeps_depth(monkeypatch):
    specs = {L: build_spec(compose(["tracker=none", "site=p_last", f"layer={L}"])) for L in (4, 8, 6)}
    seen = []
    monkeypatch.setattr(runner, "capture_cells", lambda lm, book, cells, **kw: seen.append(kw["depth"]) or [])
    monkeypatch.setattr(runner, "CAPTURE_DEPTH", {})
    lm = SimpleNamespace(name="qwen0.5", n_layers=24)
    runner.capture(lm, specs[4], [], book=None, cache=None, batch_cells=4)
    assert seen == [5]  # a lone job: just deep enough for its layer
    for spec in specs.values():
        runner.plan_sweep_depth("qwen0.5", spec)
    for L in (4, 8, 6):
        runner.capture(lm, specs[L], [], book=None, cache=None, batch_cells=4)
    assert seen[1:] == [9, 9, 9]  # every job of the sweep: the deepest (layer 8) + 1, captured once
    other = SimpleNamespace(name="smollm2", n_layers=30)
    runner.capture(other, specs[4], [], book=None, cache=None, batch_cells=4)
    assert seen[-1] == 5  # the plan is per model (and grid)


def test_the_multirun_callback_plans_every_job(monkeypatch):
    planned = []
    monkeypatch.setattr(runner, "plan_sweep_depth", lambda name, spec: planned.append((name, spec.layers)))
    from lac.multirun import LacCallback

    cfg = compose(["tracker=none", "site=p_last", "layer=4"])
    monkeypatch.setattr("lac.multirun.job_overrides", lambda config: [["layer=4"], ["layer=7"]])

    composed = {L: compose(["tracker=none", "site=p_last", f"layer={L}"]) for L in (4, 7)}

    class Loader:
        def load_sweep_config(self, master_config, sweep_overrides):
            return composed[int(sweep_overrides[0].split("=")[1])]

    import hydra.core.global_hydra as gh

    monkeypatch.setattr(gh.GlobalHydra, "instance", staticmethod(lambda: SimpleNamespace(config_loader=Loader)))
    LacCallback().on_multirun_start(cfg)
    assert planned == [("qwen0.5", (4,)), ("qwen0.5", (7,))]


def test_hydra_gets_lacs_compositions_back_with_the_masters_timestamps(monkeypatch):
    """Hydra composes each job again in its sweeper's check and in its launcher (~0.1 s each); after lac's
    check those get a copy of lac's composition, with the master's resolver cache (a timestamp resolved
    after the check, as the sweep dir's is, must be the master's), and anything else composes as before."""
    import copy

    from omegaconf import OmegaConf, open_dict

    from lac.multirun import LacCallback

    monkeypatch.setattr(runner, "plan_sweep_depth", lambda name, spec: None)
    monkeypatch.setattr("lac.multirun.job_overrides", lambda config: [["layer=4"], ["layer=7"]])
    master = compose(["tracker=none", "site=p_last", "layer=4"])
    with open_dict(master):
        master.stamp = "${now:%H:%M:%S.%f}"
    calls = []
    made = {L: compose(["tracker=none", "site=p_last", f"layer={L}"]) for L in (4, 5, 7)}  # Hydra's, before the patch

    class Loader:
        def load_sweep_config(self, master_config, sweep_overrides):
            calls.append(list(sweep_overrides))
            cfg = copy.deepcopy(made[int(sweep_overrides[0].split("=")[1])])
            with open_dict(cfg):
                cfg.stamp = "${now:%H:%M:%S.%f}"
            OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
            return cfg

    loader = Loader()
    import hydra.core.global_hydra as gh

    monkeypatch.setattr(gh.GlobalHydra, "instance", staticmethod(lambda: SimpleNamespace(config_loader=lambda: loader)))
    LacCallback().on_multirun_start(master)
    assert calls == [["layer=4"], ["layer=7"]]
    stamp = master.stamp  # resolved (and cached in the master) only now, after lac's check
    first = loader.load_sweep_config(master, ["layer=7"])  # Hydra's launcher calls it positionally
    second = loader.load_sweep_config(master_config=master, sweep_overrides=["layer=7"])
    assert calls == [["layer=4"], ["layer=7"]]  # nothing composed again
    assert first.layer == 7 and first.stamp == stamp == second.stamp
    with open_dict(first):
        first.hydra_job_num = 1  # the launcher writes into its config: never into lac's or another's
    assert "hydra_job_num" not in second
    assert loader.load_sweep_config(master, ["layer=5"]).layer == 5  # not one of the sweep's jobs
    other = copy.deepcopy(master)
    loader.load_sweep_config(other, ["layer=7"])  # another master config
    assert calls[2:] == [["layer=5"], ["layer=7"]]


def test_early_wandb_run_of_a_failed_job_is_finished_as_failed(tmp_path):
    """W&B starts beside the compute (issue 14); a job that then fails ends its run with exit code 1."""
    from concurrent.futures import Future

    from lac.results import JobStore

    finished = []
    tracker = SimpleNamespace(finish=lambda exit_code=None: finished.append(exit_code))
    pending = Future()
    pending.set_result(tracker)
    runner._abandon_tracking(pending)
    assert finished == [1]
    runner._abandon_tracking(None)  # tracker=none: nothing to do
    store = JobStore(tmp_path, "k")
    cfg = compose(["tracker=none"])
    assert runner._start_tracking(cfg, store, "rid", tmp_path, "n", {}) is None
    broken = Future()
    broken.set_exception(RuntimeError("no W&B"))
    runner._abandon_tracking(broken)  # the job's own error stays the one reported


@pytest.mark.parametrize("process", [True, False])
def test_a_rerun_starts_wandb_beside_the_compute(tmp_path, monkeypatch, process):
    """rerun=true of a job whose W&B run was logged: the new run still begins before the compute (in its
    own process once the checks pass, or in a thread once the model is loaded), not after it (the old
    store's 'tracked' mark must not count for the staging store); the failed job's run ends as failed."""
    import lac.tracker_process
    from lac.results import JobStore
    from lac.tracking import run_id_for

    cfg = compose(["tracker=wandb", "tracker.mode=offline", "rerun=true", f"tracker.process={process}",
                   f"results_root={tmp_path / 'store'}"])
    key = runner.job_key(cfg)
    final = JobStore(tmp_path / "store", key)
    final.dir.mkdir(parents=True)
    final.mark_tracked(run_id_for(key, cfg.tracker), "an earlier run")
    events = []

    def fake_start(cfg_, store, run_id, *args):
        events.append(("thread", store.tracked(run_id)))
        return None

    class FakeRemote:
        def __init__(self):
            events.append(("spawned",))

        def begin(self, tcfg, *, run_id, **kw):
            events.append(("begin", run_id))

        def result(self):
            return self

        def finish(self, exit_code=None):
            events.append(("finish", exit_code))

        def release(self):
            events.append(("release",))

    def fake_compute(cfg_, spec, store, key_, config, t0, on_loaded=lambda: None, on_checked=lambda: None):
        events.append(("checks pass",))
        on_checked()
        events.append(("model loaded",))
        on_loaded()
        raise RuntimeError("stop after the model is loaded")

    monkeypatch.setattr(runner, "_start_tracking", fake_start)
    monkeypatch.setattr(lac.tracker_process, "RemoteTracker", FakeRemote)
    monkeypatch.setattr(runner, "_compute", fake_compute)
    with pytest.raises(RuntimeError, match="stop after"):
        runner.run(cfg, job_dir=tmp_path)
    if process:  # spawned as the job starts, begun when its checks pass, ended as failed with the job
        assert events == [("spawned",), ("checks pass",), ("begin", run_id_for(key, cfg.tracker)),
                          ("model loaded",), ("finish", 1)]
    else:  # asked with the rerun's own (untracked) store, so the run starts early
        assert events == [("checks pass",), ("model loaded",), ("thread", False)]
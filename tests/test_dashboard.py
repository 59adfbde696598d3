"""lac.dashboard: the W&B workspace built offline, its panels checked against keys lac really logs.

Nothing reaches a network: WANDB_MODE=offline, no API key, WANDB_BASE_URL a closed local port.
The slow test runs the embedded models (a 2-model x 3-layer multirun, a table-4 layer-set job,
a markers job and a multi-layer job, all on a 2-cell grid) with tracker=wandb offline and reads
their runs back with the tests' .wandb reader.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from wandb_reader import find_runs, read_run

from lac import dashboard

REPO = Path(__file__).resolve().parents[1]
GROUP = "dash-test"
TINY_GRID = """\
baseline: {persona: a thoughtful person, task: Give advice to someone facing a difficult decision.}
personas: {yoda: Yoda, chef: a head chef trained in classical French technique}
tasks: {haiku: Write a haiku about Monday mornings.}
markers:
  yoda: [hmm, young one, force]
  chef: [seasonal, ingredient, flavor, fresh]
"""


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_ENTITY", "WANDB_PROJECT",
                "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def _check_panels(view: dict, history: set[str], summary: set[str], config: set[str]) -> list[str]:
    """Every panel's keys among the runs' keys: lines plot history keys against a history key,
    bars plot summary keys, both group by a config key. Returns the panel titles."""
    titles = []
    for section, title, keys in dashboard.panel_keys(view):
        if keys["x"]:
            assert set(keys["x"]) <= history, (section, title, keys)
            assert set(keys["y"]) <= history, (section, title, keys)
        else:
            assert keys["y"] and set(keys["y"]) <= summary, (section, title, keys)
        assert keys["groupby"] and set(keys["groupby"]) <= config, (section, title, keys)
        titles.append(f"{section} | {title}")
    return titles


# --------------------------------------------------------------------------- fast


def test_catalogue_workspace_offline_has_every_section(tmp_path, capsys):
    out = tmp_path / "ws.json"
    assert dashboard.main(["--entity", "e", "--project", "p", "--group", "g", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "not saved (W&B is offline (no API key, or WANDB_MODE=offline))" in stdout
    assert dashboard.main(["--entity", "e", "--project", "p", "--out", str(tmp_path / "dry.json"), "--dry-run"]) == 0
    assert "not saved (--dry-run)" in capsys.readouterr().out
    view = json.loads(out.read_text())
    assert view["entity"] == "e" and view["project"] == "p"
    sections = [s["name"] for s in view["spec"]["section"]["panelBankConfig"]["sections"]]
    assert sections == ["KL by layer", "Geometry by layer", "Markers", "Host injection", "Controls",
                        "Controls and mechanism"]
    cat = dashboard.catalogue()
    titles = _check_panels(view, cat.history, cat.summary, cat.config)
    assert "KL by layer | KL · p_last · additive" in titles
    assert "Geometry by layer | inter_ratio · g1" in titles
    assert "Host injection | KL · p_last · host_additive by layer set" in titles
    assert "Controls and mechanism | KL · p_last · kv_persona (from L, x = L)" in titles
    assert "Controls and mechanism | attention mass on the persona span · p_last · attn_persona" in titles
    run_set = view["spec"]["section"]["runSets"][0]
    assert run_set["grouping"] == [{"section": "config", "name": "model.value"}]
    assert run_set["filters"]["filters"][0]["value"] == "g"
    line = next(p for s in view["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]
                if p["viewType"] == "Run History Line Plot")
    assert line["config"]["xAxis"] == "layer_frac" and line["config"]["groupBy"] == "model.value"


def test_save_without_a_key_is_a_clear_error_and_the_json_is_written(tmp_path, capsys):
    out = tmp_path / "ws.json"
    assert dashboard.main(["--entity", "e", "--project", "p", "--save", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--save needs W&B online with an API key" in err and str(out) in err
    assert json.loads(out.read_text())["project"] == "p"


def test_no_runs_in_the_group_nothing_written(tmp_path, capsys):
    out = tmp_path / "ws.json"
    (tmp_path / "empty").mkdir()
    rc = dashboard.main(["--entity", "e", "--project", "p", "--group", "nope", "--runs",
                         str(tmp_path / "empty"), "--out", str(out)])
    assert rc == 2
    assert "no runs in group 'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_online_unknown_project_passes_the_wandb_error_through(tmp_path, monkeypatch, capsys):
    import wandb

    class Api:
        def __init__(self, *a, **k):
            pass

        def runs(self, path, **k):
            raise ValueError(f"Could not find project {path.split('/')[1]}")

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "Api", Api)
    out = tmp_path / "ws.json"
    rc = dashboard.main(["--entity", "nobody", "--project", "ghost", "--group", "g", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "W&B could not list the runs of nobody/ghost in group 'g'" in err
    assert "ValueError: Could not find project ghost" in err
    assert not out.exists()


def test_online_keys_build_panels_from_the_runs(monkeypatch):
    import wandb

    class Run:
        summary = {"kl/p_last/additive/median": 0.1, "markers/clean/any_rate": 0.5, "_step": 3}
        config = {"model": "qwen0.5", "layer": 4}
        history_keys = {"keys": {"layer": {}, "layer_frac": {}, "by_layer/kl/p_last/additive/median": {}}}

    class Api:
        def __init__(self, *a, **k):
            pass

        def runs(self, path, filters=None, per_page=None):
            assert path == "e/p" and filters == {"group": "g"}
            return [Run(), Run()]

    monkeypatch.setattr(wandb, "Api", Api)
    keys = dashboard.online_keys("e", "p", "g")
    assert keys.runs == 2
    sections = dict(dashboard.plan(keys))
    assert [p["title"] for p in sections["KL by layer"]] == ["KL · p_last · additive"]
    assert [p["y"] for p in sections["Markers"]] == [["markers/clean/any_rate"]]


def test_swap_partner_marker_rates_get_their_own_bar():
    keys = dashboard.Keys(history={"layer"}, config={"model"},
                          summary={"markers/swap/any_rate", "markers/swap/any_rate_partner",
                                   "markers/swap/distinct_mean_partner", "markers/clean/any_rate"})
    sections = dict(dashboard.plan(keys))
    assert [p["y"] for p in sections["Markers"]] == [["markers/clean/any_rate", "markers/swap/any_rate"],
                                                     ["markers/swap/any_rate_partner"]]
    assert "Other results" not in sections or not any(
        "markers/" in str(p["y"]) for p in sections["Other results"])


def test_new_keys_get_panels_in_other_results():
    keys = dashboard.Keys(history={"layer", "layer_frac", "by_layer/steer/p_last/median"},
                          summary={"mechanism/p_last/ablation_kl", "kl/p_last/L4/additive/median"},
                          config={"model"})
    sections = dict(dashboard.plan(keys))
    assert [p["y"] for p in sections["Other results"]] == [["by_layer/steer/p_last/median"],
                                                           ["mechanism/p_last/ablation_kl"]]


def test_catalogue_reads_the_interventions_from_their_configs(tmp_path, monkeypatch):
    """Every conf/intervention/*.yaml name is catalogued: the new controls, their "from L" curves
    (x = L) and the attention metrics; a new config's name appears without touching lac.dashboard."""
    import yaml

    from lac.paths import conf_dir

    names = {yaml.safe_load(f.read_text())["name"] for f in (Path(conf_dir()) / "intervention").glob("*.yaml")}
    assert {"host_none_lm", "host_oracle_lm", "host_oracle_norm", "host_oracle_span", "kv_persona",
            "knockout_persona"} <= names
    assert set(dashboard.interventions()) == names
    assert dashboard.interventions()["kv_persona"] == {"each", "from"}  # kv_persona.yaml, kv_persona_from.yaml
    keys = dashboard.catalogue()
    for iv in ("host_oracle_lm", "host_oracle_norm", "host_oracle_span", "kv_persona", "knockout_persona"):
        assert f"by_layer/kl/p_last/{iv}/median" in keys.history, iv
    for iv in ("kv_persona_from", "knockout_persona_from"):
        assert f"by_layer/kl/p_last/{iv}/median" in keys.history, iv
    assert "kl/p_last/none/host_none_lm/median" in keys.summary
    assert "by_layer/kl/p_last/host_none_lm/median" not in keys.history  # nothing written: no layer
    for m in ("attn_persona", "attn_persona_max", "attn_persona_window", "attn_persona_window_max"):
        assert f"by_layer/{m}/p_last/median" in keys.history and f"{m}/p_last/L10/median" in keys.summary
    sections = dict(dashboard.plan(keys))
    mech = {p["title"]: p for p in sections["Controls and mechanism"]}
    assert mech["KL · p_last · knockout_persona (from L, x = L)"]["y"] == [
        "by_layer/kl/p_last/knockout_persona_from/median"]
    assert mech["KL · p_last · references (nothing written)"]["y"] == [
        "kl/p_last/none/host_none/median", "kl/p_last/none/host_none_lm/median", "kl/p_last/none/clean/median"]
    assert "Other results" not in sections  # every catalogued key has its place
    assert not any("host_oracle_lm" in p["title"] for p in sections["Controls"])

    # a new intervention config: catalogued by its name field
    conf = tmp_path / "conf"
    (conf / "intervention").mkdir(parents=True)
    for f in (Path(conf_dir()) / "intervention").glob("*.yaml"):
        (conf / "intervention" / f.name).write_text(f.read_text())
    (conf / "intervention" / "steer.yaml").write_text("name: steer_persona\nlayers: null\n")
    monkeypatch.setattr("lac.paths.conf_dir", lambda: str(conf))
    keys = dashboard.catalogue()
    assert "by_layer/kl/p_last/steer_persona/median" in keys.history
    assert any(p["y"] == ["by_layer/kl/p_last/steer_persona/median"]
               for p in dict(dashboard.plan(keys))["Controls"])


# --------------------------------------------------------------------------- slow: real offline runs


def _lac_run(args: list[str], env: dict, cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "lac.run", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "litlogger" not in r.stdout + r.stderr and "LeafSpec" not in r.stdout + r.stderr  # quiet logs
    assert "failed" not in r.stdout.lower(), r.stdout[-3000:]


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    """Offline W&B runs lac wrote: 2 models x 3 layers (multirun), a multi-layer job, a table-4
    layer-set job (host_additive at m3) and a markers job; all in group dash-test, under WANDB_DIR."""
    root = tmp_path_factory.mktemp("dash")
    (root / "tiny.yaml").write_text(TINY_GRID)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(root / "wandb"), WANDB_BASE_URL="http://127.0.0.1:9",
               WANDB_CONFIG_DIR=str(root / "wandb-config"), NETRC=str(root / "no-netrc"),
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    common = [f"grid.path={root / 'tiny.yaml'}", "grid=custom", "site=p_last", "tracker=wandb",
              f"sweep_name={GROUP}", f"results_root={root / 'results'}"]
    _lac_run(["-m", "model=qwen0.5,smollm2", "layer=4,8,12", *common, f"hydra.sweep.dir={root / 'multi'}"],
             env, REPO)
    _lac_run(["model=smollm2", "layer=[4,8,12]", *common, f"hydra.run.dir={root / 'one'}"], env, REPO)
    _lac_run(["model=smollm2", "intervention=host_additive", "intervention.layers=m3", *common,
              f"hydra.run.dir={root / 'host'}"], env, REPO)
    _lac_run(["model=smollm2", "experiment=markers", *common, "markers.max_new_tokens=6",
              f"hydra.run.dir={root / 'markers'}"], env, REPO)
    return root


@pytest.mark.slow
def test_workspace_panels_match_the_keys_of_real_offline_runs(offline_runs, tmp_path, monkeypatch):
    wdir = offline_runs / "wandb"
    runs = [read_run(d) for d in find_runs(wdir)]
    assert not find_runs(offline_runs / "multi") and not find_runs(offline_runs / "one")  # WANDB_DIR won
    assert [r.run["group"] for r in runs] == [GROUP] * 9  # one run per job: 6 + multi-layer + host + markers
    assert all(r.exit_code == 0 for r in runs)
    history = {k for r in runs for row in r.history for k in row if not k.startswith("_")}
    summary = {k for r in runs for k in r.summary if not k.startswith("_")}
    config = {k for r in runs for k in r.config}
    by_job = {(r.config["model"], r.config["intervention"], r.config["mode"], r.config["layers"]): r for r in runs}
    host = by_job[("smollm2", "host_additive", "kl", "12,14,16")]  # m3 on 30 layers (smollm2.yaml)
    assert host.config["layer"] == 16 and host.summary["kl/p_last/host_additive/median"] > 0
    assert by_job[("smollm2", "additive", "kl", "4,8,12")].config["layer"] == [4, 8, 12]
    assert {r.config["model"] for r in runs} == {"qwen0.5", "smollm2"}

    # the same curve from the multi-layer job and from the sweep's one-layer jobs
    def curve(rs):
        return {int(row["layer"]): row["by_layer/kl/p_last/additive/median"]
                for r in rs for row in r.history if "by_layer/kl/p_last/additive/median" in row}

    sweep = [r for r in runs if r.config["model"] == "smollm2" and r.config["layers"] in ("4", "8", "12")]
    multi = curve([by_job[("smollm2", "additive", "kl", "4,8,12")]])
    assert sorted(multi) == [4, 8, 12]
    np.testing.assert_allclose([multi[L] for L in (4, 8, 12)], [curve(sweep)[L] for L in (4, 8, 12)],
                               rtol=1e-4, atol=1e-6)

    # the workspace from these runs: every panel names keys they hold
    out = tmp_path / "ws.json"
    assert dashboard.main(["--entity", "e", "--project", "lac", "--group", GROUP, "--runs", str(wdir),
                           "--out", str(out)]) == 0
    titles = _check_panels(json.loads(out.read_text()), history, summary, config)
    for want in ("KL by layer | KL · p_last · additive", "Geometry by layer | cos_xy_sum · p_last",
                 "Geometry by layer | cos_x_y · p_last", "Geometry by layer | inter_ratio · p_last",
                 "Markers | any-marker rate by condition", "Markers | mean distinct markers by condition",
                 "Host injection | KL · p_last · host_additive by layer set"):
        assert want in titles, titles
    assert not any(t.startswith("Other results") for t in titles), titles

    # the code-derived catalogue (used offline without --runs) covers every key the runs hold
    cat = dashboard.catalogue()
    norm = lambda k: re.sub(r"/L[0-9+]+/", "/L*/", k)  # noqa: E731
    assert {norm(k) for k in history} <= {norm(k) for k in cat.history} | {"_timestamp", "_runtime"}
    assert {norm(k) for k in summary} <= {norm(k) for k in cat.summary}
    _check_panels(json.loads(out.read_text()), cat.history, cat.summary, cat.config)


@pytest.mark.slow
def test_cross_model_report_from_the_multirun_and_the_multi_layer_job(offline_runs, tmp_path):
    from lac import report

    jobs = report.find_job_dirs([offline_runs / "multi"]).jobs
    df = report.load_results(jobs)
    fig = report.kl_by_layer_figure(df, report.model_depths(jobs, df))
    (ax,) = fig.axes  # one grid, one site
    lines = {ln.get_label(): ln for ln in ax.get_lines() if ln.get_linestyle() == "-"}
    assert sorted(lines) == ["qwen0.5", "smollm2"]
    np.testing.assert_allclose(lines["qwen0.5"].get_xdata(), np.array([4, 8, 12]) / 24)
    np.testing.assert_allclose(lines["smollm2"].get_xdata(), np.array([4, 8, 12]) / 30)
    assert all(0 <= t <= 1 for t in ax.get_xticks())

    one = report.find_job_dirs([offline_runs / "one"]).jobs
    df_one = report.load_results(one)
    fig_one = report.kl_by_layer_figure(df_one, report.model_depths(one, df_one))
    (ln_one,) = [ln for ln in fig_one.axes[0].get_lines() if ln.get_linestyle() == "-"]
    np.testing.assert_allclose(ln_one.get_xydata(), lines["smollm2"].get_xydata(), rtol=1e-4, atol=1e-6)

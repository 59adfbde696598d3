"""From a composed Hydra config to a validated experiment spec, before any model loads.

Everything a user can get wrong on the command line is checked here, with an
error that names the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lac import kernels
from lac.errors import LacError
from lac.grid import Grid, grid_from_mapping, load_grid, with_partners
from lac.interventions import (
    INTERVENTIONS,
    NEEDS_ALPHA,
    WHOLE_DESIGN,
    Intervention,
    Job,
    get_intervention,
)
from lac.io import unwritable
from lac.models import check_model_available, local_config, resolve_device, resolve_dtype
from lac.numerics import NUMERICS_VERSION
from lac.prompts import bare_messages
from lac.schema import DEFAULT_PARTNER, partner_label
from lac.sites import SITES, check_sites

MODES = ("kl", "markers")


class ConfigError(LacError):
    """A config value lac cannot run with."""


@dataclass
class Spec:
    mode: str
    grid: Grid
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    interventions: tuple[Intervention, ...]
    jobs: tuple[Job, ...]
    geometry_layers: tuple[int, ...]
    n_layers: int
    max_new_tokens: int
    conditions: tuple[str, ...]
    marker_layers: tuple[int, ...] = ()  # the layer set every changing marker condition uses
    condition_ivs: tuple[Intervention, ...] = ()  # markers mode: the conditions, built for the grid
    attn_mass: bool = False  # attn_persona rows from the clean XY run, every layer


def check_group_choices(overrides: Sequence[str], conf: str | Path) -> None:
    """An option a config group does not have (`site=plast`, or one value of `-m model=qwen0.5,qwen05`)
    as one line naming it and the group's options, before Hydra composes: Hydra's own message is a dozen
    lines (twice in a multirun), and in a notebook it is not a LacError. What Hydra cannot parse, a
    group of Hydra's own (hydra/launcher) and a search path of the user's are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    groups = {p.name: p for p in Path(conf).iterdir() if p.is_dir() and p.name != "hydra"}
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # Hydra's parse error names the override and the grammar
        return
    if any(o.key_or_group.startswith("hydra.searchpath") for o in parsed):
        return
    for o in parsed:
        folder = groups.get(o.key_or_group)
        if folder is None or o.package is not None or o.is_delete():
            continue
        if o.value_type == ValueType.ELEMENT:
            values = [o.value()]
        elif o.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
            values = list(o.sweep_string_iterator())
        else:
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if any(isinstance(v, (list, tuple)) for v in values):  # Hydra merges them: the last option silently wins
            hint = ("; several sites in one job: site=transition (p_last, g1, g2) or site=all"
                    if o.key_or_group == "site" else "")
            raise ConfigError(f"{o.input_line}: a config group takes one option, not a list (Hydra would merge them "
                              f"and run only the last); for one job per option: -m {o.key_or_group}=a,b{hint}; "
                              f"allowed: {', '.join(options)}")
        bad = [v for v in values if isinstance(v, str) and v not in options]
        if bad:
            raise ConfigError(f"unknown {o.key_or_group} {', '.join(map(repr, bad))}; allowed: {', '.join(options)}")


def n_layers_of(model_cfg: DictConfig) -> int:
    """Depth from the model config (shipped configs state it; else its config.json, no weights)."""
    if model_cfg.get("n_layers"):
        return int(model_cfg.n_layers)
    found = local_config(model_cfg)
    if not found:
        check_model_available(model_cfg)  # a missing folder or a hub id neither cached nor reachable, by name
    if not found or "num_hidden_layers" not in found:
        raise ConfigError(f"model {model_cfg.get('name')!r}: no n_layers in its config and no readable config.json "
                          f"for {model_cfg.get('id')!r}; add n_layers: N to the model config")
    return int(found["num_hidden_layers"])


def _layer_list(value: Any, model_cfg: DictConfig, what: str, also: tuple[str, ...] = ()) -> list[int]:
    """An int, a list, "from:L" (L..n_layers-1), or a name: paper / long (the model's grids) or a
    model.layer_sets key."""
    if isinstance(value, str) and value.startswith("from:"):
        n = n_layers_of(model_cfg)
        start = value[5:]
        if not start.lstrip("-").isdigit() or not 0 <= int(start) < n:
            raise ConfigError(f"{what}={value!r}: 'from:L' needs an integer L in 0..{n - 1} ({model_cfg.name} has {n} layers)")
        return list(range(int(start), n))
    if value is None:
        n = n_layers_of(model_cfg)
        raise ConfigError(f"{what} is not set and {model_cfg.name} has no default_layer; give {what}=N "
                          f"(0..{n - 1}), a list [a,b], or from:L")
    if isinstance(value, str):
        named = {"paper": model_cfg.get("paper_layers"), "long": model_cfg.get("long_layers"),
                 **dict(model_cfg.get("layer_sets") or {})}
        if named.get(value) is None:
            names = [*also, *(k for k, v in named.items() if v is not None)]
            allowed = (f"allowed names for {model_cfg.name}: {', '.join(names)}, or ints" if names else
                       f"{model_cfg.name} names no layer lists (paper_layers, long_layers, layer_sets): give ints")
            raise ConfigError(f"{what}={value!r}: not a layer list; {allowed}")
        value = named[value]
    if isinstance(value, (ListConfig, list, tuple)):
        out = list(value)
    else:
        out = [value]
    if not out:
        raise ConfigError(f"{what} is an empty list; give at least one layer, e.g. {what}=10")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{what}={value!r}: layers are ints, or one name (paper, long, a model.layer_sets "
                              f"key, from:L), got {v!r}")
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise ConfigError(f"{what}={out}: layer {dup[0]} is given twice; each layer at most once")
    return out


def _check_range(layers: list[int], n: int, what: str, model: str) -> None:
    for v in layers:
        if not 0 <= v < n:
            raise ConfigError(f"{what}: layer {v} is out of range for {model} ({n} layers): allowed 0..{n - 1}")


def load_grid_cfg(cfg: DictConfig) -> Grid:
    g = cfg.grid
    if g.get("path") not in (None, "", "???") and not OmegaConf.is_missing(g, "path"):
        shipped = [k for k in ("personas", "tasks", "factors", "messages") if g.get(k) is not None]
        if shipped:  # grid=short grid.path=F ran F's cells under the name 'short'
            raise ConfigError(f"grid.path={g.path} with grid={g.get('name')}: a grid file goes with grid=custom "
                              f"(grid {g.get('name')!r} has prompts of its own, and its name would label the file's "
                              f"results): python -m lac.run grid=custom grid.path={g.path}")
        return load_grid(g.path, name=g.get("name") or Path(g.path).stem)
    if OmegaConf.is_missing(g, "path"):
        raise ConfigError("grid=custom needs grid.path=/path/to/grid.yaml")
    data = OmegaConf.to_container(g, resolve=True)
    return grid_from_mapping(data, name=g.name, where=f"grid {g.name!r}")


def _intervention(icfg: DictConfig, grid: Grid) -> tuple[Intervention, Grid]:
    """The job's intervention built for the grid's design (factor, alpha, swap partner), and the grid
    (with swap partners set for swap)."""
    name = str(icfg.get("name"))
    factor = icfg.get("factor")
    if name in WHOLE_DESIGN and factor is not None:
        acts_on_one = sorted(n for n in INTERVENTIONS if n not in WHOLE_DESIGN and not n.startswith("host_"))
        raise ConfigError(f"intervention.factor={factor!r}: {name} is about the whole design, no one factor; "
                          f"a factor applies to {', '.join(acts_on_one)}")
    if factor is None:  # the persona; a design without one: any factor for those about every factor
        if "persona" in grid.factor_names:
            factor = "persona"
        elif name in WHOLE_DESIGN:
            factor = grid.factor_names[0]
        else:
            raise ConfigError(f"intervention {name} acts on one factor and grid {grid.name!r} has no persona "
                              f"factor: set +intervention.factor=<one of {', '.join(grid.factor_names)}>")
    if not isinstance(factor, str) or factor not in grid.factor_names:
        raise ConfigError(f"intervention.factor={factor!r}: not a factor of grid {grid.name!r}; "
                          f"allowed: {', '.join(grid.factor_names)}")
    alpha = icfg.get("alpha")
    if name in NEEDS_ALPHA or alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ConfigError(f"intervention.alpha={alpha!r}: allowed: a finite number "
                              "(1 = clean, 0 = the factor removed, 2 = doubled)")
        if name not in NEEDS_ALPHA:
            raise ConfigError(f"intervention.alpha is set but {name} has no dose; allowed with: {', '.join(NEEDS_ALPHA)}")
        alpha = float(alpha)
    if name == "swap":
        rule = icfg.get("partner", DEFAULT_PARTNER)
        rule = OmegaConf.to_container(rule) if isinstance(rule, DictConfig) else rule
        try:
            grid = with_partners(grid, factor, rule)
        except LacError as e:
            raise ConfigError(f"intervention.partner: {e}") from None
    elif icfg.get("partner") is not None:
        raise ConfigError(f"intervention.partner is set but {name} swaps nothing; allowed with: swap")
    try:
        iv = get_intervention(name, grid, factor, alpha)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if name == "swap":
        iv.partner = partner_label(rule)
    return iv, grid


# keys every model config has (null allowed where noted in conf/model/local.yaml)
MODEL_KEYS = ("name", "source", "id", "dtype", "device", "attn_implementation", "n_layers", "default_layer")


def _check_model_keys(m: DictConfig) -> None:
    """A model config of one's own names every key at once, not one OmegaConf traceback per key."""
    lacking = [k for k in MODEL_KEYS if k not in m.keys()]  # `in m` is False for a ??? value too
    if lacking:
        raise ConfigError(f"model config {m.get('name', '?')!r} lacks {', '.join(lacking)}; a model config needs "
                          f"{', '.join(MODEL_KEYS)} (null for n_layers: read from config.json; conf/model/local.yaml "
                          "is the template)")
    if OmegaConf.is_missing(m, "id"):
        raise ConfigError(f"model={m.name} needs model.id=/path/to/hf_folder (or a hub id org/name)")


def build_spec(cfg: DictConfig) -> Spec:
    """Validate the composed config; raises ConfigError (or GridError) before any heavy work."""
    mode = cfg.get("mode", "kl")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    m = cfg.model
    _check_model_keys(m)
    if m.get("source") not in ("hub", "embedded"):
        raise ConfigError(f"model.source={m.get('source')!r}; allowed: hub, embedded")
    if m.source == "embedded":
        from lac.embedded import EMBEDDED

        if m.get("embedded") not in EMBEDDED:
            raise ConfigError(f"model.embedded={m.get('embedded')!r}; allowed: {', '.join(EMBEDDED)}")
        if not str(m.id).startswith("embedded/"):  # the embedded GGUF loads whatever id says
            raise ConfigError(f"model.id={m.id!r} is not what {m.name} loads: model.source=embedded runs its own "
                              f"GGUF ({m.embedded}); to run a folder or hub id: model=local model.id={m.id} "
                              "(README: Your own model)")
    kernels.resolve(m.get("linear", "auto"), resolve_dtype(m.dtype), resolve_device(m.device))
    for name in ("batch_cells", "capture_cells", "max_rows"):
        value = cfg.get("engine", {}).get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"engine.{name}={value!r}; allowed: an integer >= 1")
    traces = cfg.get("engine", {}).get("cache_traces", "auto")
    if traces not in ("auto", True, False):
        raise ConfigError(f"engine.cache_traces={traces!r}; allowed: auto (on where the model runs on the CPU), "
                          "true, false")
    timeout = cfg.get("engine", {}).get("lock_timeout", -1)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or (timeout < 0 and timeout != -1):
        raise ConfigError(f"engine.lock_timeout={timeout!r}; allowed: seconds >= 0, or -1 for no limit")
    n = n_layers_of(m)
    grid = load_grid_cfg(cfg)
    try:
        sites = check_sites(cfg.site.sites)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    layers = _layer_list(cfg.layer, m, "layer")
    _check_range(layers, n, "layer", m.name)

    iv, grid = _intervention(cfg.intervention, grid)
    if iv.attention and m.get("attn_implementation") != "eager":
        raise ConfigError(f"intervention {iv.name} edits attention, which needs eager attention; "
                          f"{m.name} is configured with {m.get('attn_implementation')!r}: set model.attn_implementation=eager")
    iv_layers = cfg.intervention.get("layers")
    iv_set = None  # one layer set for every site; checked also where nothing is written, so a typo never passes
    if iv_layers not in (None, "from"):
        iv_set = _layer_list(iv_layers, m, "intervention.layers")
        _check_range(iv_set, n, "intervention.layers", m.name)
    jobs: list[Job] = []
    for site in sites:
        if not iv.writes:
            jobs.append(Job(iv, site, ()))
        elif iv_layers == "from":  # one set per job layer L: L..n_layers-1
            jobs.extend(Job(iv, site, tuple(range(L, n))) for L in layers)
        elif iv_set is not None:
            jobs.append(Job(iv, site, tuple(sorted(set(iv_set)))))
        else:
            jobs.extend(Job(iv, site, (L,)) for L in layers)

    geo = cfg.get("geometry_layers")
    if geo == "all":
        geometry = list(range(n))
    elif geo is None:
        geometry = layers
    else:
        geometry = _layer_list(geo, m, "geometry_layers", also=("all",))
    _check_range(geometry, n, "geometry_layers", m.name)

    conditions = tuple(cfg.markers.conditions)
    condition_ivs: list[Intervention] = []
    max_new = cfg.markers.max_new_tokens
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
        raise ConfigError(f"markers.max_new_tokens={max_new!r}; allowed: an integer > 0 (the paper: 80)")
    if not isinstance(cfg.get("rerun", False), bool):
        raise ConfigError(f"rerun={cfg.get('rerun')!r}; allowed: true or false")
    attn_mass = cfg.get("attn_persona", False)
    if not isinstance(attn_mass, bool):
        raise ConfigError(f"attn_persona={attn_mass!r}; allowed: true or false")
    if attn_mass and m.get("attn_implementation") != "eager":
        raise ConfigError("attn_persona reads attention weights, which needs eager attention: "
                          "set model.attn_implementation=eager")
    if attn_mass and mode == "markers":
        raise ConfigError("attn_persona=true writes its rows in mode=kl jobs (the clean XY run's KL window); "
                          "mode=markers generates text and would drop them: run attn_persona=true without "
                          "experiment=markers")
    if attn_mass and "persona" not in grid.factor_names:
        raise ConfigError(f"attn_persona=true measures attention on the persona span, and grid {grid.name!r} has "
                          f"no persona factor (factors: {', '.join(grid.factor_names)})")
    if iv.name == "bare" or (mode == "markers" and "bare" in conditions):
        bare_messages(grid)  # refuses a design without a bare prompt
    if mode == "markers":
        if not grid.markers:
            raise ConfigError(f"mode=markers needs persona markers, and grid {grid.name!r} has none (use grid=markers or add a markers: section)")
        missing = [p for p in grid.personas if p not in grid.markers]
        if missing:
            raise ConfigError(f"grid {grid.name!r} has no markers for personas {missing}")
        for c in conditions:
            if c == iv.name:
                condition_ivs.append(iv)  # the job's intervention, with its factor / alpha / partner
                continue
            if c in ("swap", *NEEDS_ALPHA):  # partner rule or dose: only the job's own intervention has one
                raise ConfigError(f"marker condition {c} takes its {'partner rule' if c == 'swap' else 'dose'} from "
                                  f"the job's intervention: add intervention={c} (markers.conditions={list(conditions)})")
            try:
                civ = get_intervention(str(c), grid)
            except ValueError as e:
                raise ConfigError(f"marker condition: {e}") from None
            if civ.attention and m.get("attn_implementation") != "eager":
                raise ConfigError(f"marker condition {c} edits attention, which needs eager attention: "
                                  "set model.attn_implementation=eager")
            condition_ivs.append(civ)
        if iv.name not in conditions:  # e.g. intervention=steer experiment=markers: the dose is a condition
            condition_ivs.append(iv)
            conditions = (*conditions, iv.name)
        if len(layers) != 1:
            raise ConfigError(f"mode=markers patches one layer (or intervention.layers=[...] / from:L for a set); "
                              f"got layer={layers}")
        if sites != ("p_last",):
            raise ConfigError(f"mode=markers patches p_last (the prompt pass only); got site {sites}")
    return Spec(
        mode=mode, grid=grid, sites=sites, layers=tuple(layers), interventions=(iv,),
        jobs=tuple(jobs), geometry_layers=tuple(sorted(set(geometry))), n_layers=n,
        max_new_tokens=max_new, conditions=conditions, condition_ivs=tuple(condition_ivs),
        attn_mass=attn_mass,
        marker_layers=tuple(jobs[0].layers) if iv_layers is not None and jobs and jobs[0].layers else tuple(layers),
    )


def check_results_root(root: Any) -> Path:
    """results_root must name a folder this process can write, or one it can make: checked before any
    model loads, without making it (a refused job leaves no folder; the job's store makes it)."""
    if root is None or not str(root).strip():
        raise ConfigError("results_root is empty; give a folder, e.g. results_root=outputs/results")
    path = Path(str(root)).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"results_root={str(root)!r} is a file, not a folder; give a folder for the job store")
    if why := unwritable(path):
        raise ConfigError(f"results_root={str(root)!r} is not writable ({why}); give a folder you can write")
    return path


def preflight(cfg: DictConfig) -> Spec:
    """Everything checkable without model weights: config, grid, tracker, results_root, the
    model's availability and depth (its config.json). Used by a job and, for every job of a
    multirun, before the first one starts."""
    from lac.tracking import check_tracker

    spec = build_spec(cfg)
    check_tracker(cfg.tracker)
    check_results_root(cfg.results_root)
    check_model_available(cfg.model)
    found = local_config(cfg.model)
    depth = (found or {}).get("num_hidden_layers") or (found or {}).get("text_config", {}).get("num_hidden_layers")
    if depth is not None and int(depth) != spec.n_layers:
        raise ConfigError(f"{cfg.model.name}: its config.json says {depth} layers but model.n_layers={spec.n_layers}; "
                          f"fix n_layers in the model config")
    return spec


# keys that change where or how a job runs, not what it computes
_NOT_CONTENT = ("hydra", "tracker", "results_root", "sweep_name", "engine", "rerun")


def job_key(cfg: DictConfig) -> str:
    """Content key of a job: the resolved config minus launcher/output/tracking settings, plus the
    numerics version (a change to lac that alters numbers must not return stale results), with a
    grid file and a model folder named by their contents, not their paths (lac.fingerprint)."""
    from lac.fingerprint import grid_file, model_files

    data = OmegaConf.to_container(cfg, resolve=True)
    for k in _NOT_CONTENT:
        data.pop(k, None)
    data["numerics"] = NUMERICS_VERSION
    model = data.get("model", {})
    model.pop("device", None)
    if files := model_files(cfg.model):  # a folder by its files (not its path), a hub id with its commit
        model["id" if files.startswith("folder:") else "commit"] = files
    grid = data.get("grid", {})
    if grid.get("path") not in (None, "", "???"):
        grid["path"] = grid_file(grid["path"])
    iv = data.get("intervention", {})
    if iv.get("name") in INTERVENTIONS and not INTERVENTIONS[iv["name"]].writes:
        iv.pop("layers", None)  # writes nothing: a layer set cannot change what it computes
    if iv.get("factor", "persona") in ("persona", None):
        iv.pop("factor", None)  # the default (null: whole-design interventions): keys from before designs stay valid
    for node, k in ((data, "layer"), (data, "geometry_layers"), (iv, "layers")):  # [10,6] is the job [6,10] is
        v = node.get(k)
        if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            node[k] = sorted(v)
    if isinstance(iv.get("alpha"), float) and iv["alpha"].is_integer():
        iv["alpha"] = int(iv["alpha"])  # alpha=2.0 is the job alpha=2 is (one key, not a recompute)
    if data.get("mode") == "markers" and iv.get("name") not in data.get("markers", {}).get("conditions", []):
        data["markers_with_intervention"] = True  # since designs: the job's intervention is a condition too
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = ["SITES", "ConfigError", "Spec", "build_spec", "check_results_root", "job_key", "load_grid_cfg", "preflight"]

"""`python -m lac.dashboard --entity E --project P [--group G]`: lac's W&B workspace, as code.

Builds a W&B workspace view with ``wandb-workspaces`` from the keys lac logs
(:mod:`lac.tracking`), runs grouped by model:

* **KL by layer**: one line plot per (site, intervention) writing a vector at one layer,
  x = ``layer_frac`` (layer / depth; ``--x layer`` for the absolute layer), y = the history key
  ``by_layer/kl/{site}/{intervention}/median``, one line per model (grouped by ``config.model``).
* **Geometry by layer**: the same for ``cos_xy_sum``, ``cos_x_y``, ``inter_ratio`` per site.
* **Markers**: any-marker rate and mean distinct markers per condition, bars per model.
* **Host injection**: median KL of host_none / host_oracle / host_additive at p_last per
  layer set (bars grouped by ``config.layers``).
* **Controls**: remove_x and every other intervention lac logs by layer that no other section
  shows, and the no-vector conditions clean and bare per site.
* **Controls and mechanism** (METHOD.md "Beyond the paper"): KL by layer of the control and
  mechanism arms (host_oracle_lm, host_oracle_span, host_oracle_norm, the other host_* controls,
  and the "from L" curves ``kv_persona_from`` / ``knockout_persona_from``, x = L, the first layer
  of the set L..n_layers-1), single-layer kv_persona / knockout_persona, the attention mass on the
  persona span by layer (attn_persona, attn_persona_window and their max over heads), and the
  references written with no vector (host_none, host_none_lm, clean) as bars per site.
* **Other results**: any key lac logs that none of the above shows (new interventions,
  mechanism or steering results), so they appear once they exist.

Where the keys come from: ``--runs PATH...`` (offline run folders, e.g. ``$WANDB_DIR``:
the keys those runs hold), else, online with an API key, the project's runs in the group
(W&B's API), else the keys lac is known to log, derived from the logging code itself and the
interventions of conf/intervention/*.yaml (:func:`catalogue`). Panels only name keys from that source.

``--dry-run`` (the default offline or without an API key) writes the view's JSON to
``--out`` (default ``wandb-workspace-<project>-<group>.json``) and prints where;
``--save`` (the default online with a key) also saves it to W&B. Exit codes: 0 done,
1 W&B refused (its error passed through), 2 nothing to build or ``--save`` impossible.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lac.io import atomic_write, unwritable
from lac.schema import ATTENTION, ATTENTION_METRICS, GEOMETRY_METRICS
from lac.sites import SITES

HISTORY = "by_layer"
X_KEYS = {"frac": "layer_frac", "layer": "layer"}
KL_ORDER = ("additive",)
CONTROL_LAYERED = ("remove_x",)
NO_VECTOR = ("clean", "bare")
HOSTS = ("host_none", "host_oracle", "host_additive")
FROM_SUFFIX = "_from"  # lac.tracking.FROM_SUFFIX: by_layer/kl/{site}/{intervention}_from/... ("from L" sets)
# the order of the Controls and mechanism section's KL panels (any other host_* control or
# "_from" curve follows); references written with no vector, drawn as bars
MECHANISM_ORDER = ("host_oracle_lm", "host_oracle_span", "host_oracle_norm", f"kv_persona{FROM_SUFFIX}",
                   f"knockout_persona{FROM_SUFFIX}", "kv_persona", "knockout_persona")
MECHANISM_REFERENCES = ("host_none", "host_none_lm", "clean")
CATALOGUE_LAYERS = 24  # the synthetic model of the catalogue: from-L sets are 10..23
MARKER_CONDITIONS = ("clean", "additive", "remove_x", "bare")
GROUP_BY = "model"  # config key the runs are grouped by: one line / bar per model
_STAT = re.compile(r"/(p25|p75|min|max)$")


class DashboardError(RuntimeError):
    """Nothing to build, or the workspace cannot be saved; the message says why."""


# --------------------------------------------------------------------------- keys


@dataclass
class Keys:
    """The keys of a set of runs: history (per-layer rows), summary and config."""

    history: set[str] = field(default_factory=set)
    summary: set[str] = field(default_factory=set)
    config: set[str] = field(default_factory=set)
    runs: int = 0
    source: str = ""

    def add(self, other: Keys) -> None:
        self.history |= other.history
        self.summary |= other.summary
        self.config |= other.config
        self.runs += other.runs


def interventions() -> dict[str, set[str]]:
    """Every intervention lac ships, read from conf/intervention/*.yaml: name -> the layer modes its
    configs ask for ("each": each of the job's layers on its own, "from": the sets L..n_layers-1,
    "set": one fixed list). Several files may name one intervention (kv_persona, kv_persona_from)."""
    import yaml

    from lac.paths import conf_dir

    out: dict[str, set[str]] = {}
    for f in sorted((Path(conf_dir()) / "intervention").glob("*.yaml")):
        try:
            data = yaml.safe_load(f.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            print(f"lac.dashboard: warning: skipped unreadable intervention config {f} ({e})", file=sys.stderr)
            continue
        name = data.get("name") if isinstance(data, dict) else None
        if not name:
            continue
        layers = data.get("layers")
        mode = "each" if layers is None else "from" if layers == "from" or str(layers).startswith("from:") else "set"
        out.setdefault(str(name), set()).add(mode)
    return out


def _writes(name: str) -> bool:
    """Whether an intervention writes at a layer (False: its KL has no layer, e.g. clean, host_none)."""
    try:
        from lac.interventions import get_intervention

        return bool(get_intervention(name).writes)
    except (ImportError, ValueError):  # a config without its class yet: assume it writes at a layer
        return True


def catalogue() -> Keys:
    """The keys lac is known to log, made by lac's own logging functions (lac.results.summary_keys,
    lac.tracking.history_rows / layer_free_keys / run_config) on a synthetic job of every site,
    intervention of conf/intervention/*.yaml (with their "from L" sets), geometry metric, attention
    metric and marker condition. No network, no model."""
    from lac.results import frame, summarize, summary_keys
    from lac.tracking import group_keys, history_rows, layer_free_keys

    base = {"model": "m", "model_id": "m", "grid": "g", "persona": "p", "task": "t", "cell": "p__t"}
    n = CATALOGUE_LAYERS

    def rows(site: str, layers: str, iv: str, metric: str) -> dict[str, Any]:
        layer = int(layers.split(",")[-1]) if layers else -1
        return {**base, "site": site, "layer": layer, "layers": layers, "intervention": iv,
                "metric": metric, "value": 0.5}

    jobs: list[list[dict[str, Any]]] = []
    for site in SITES:
        for iv, modes in sorted(interventions().items()):
            if not _writes(iv):
                jobs.append([rows(site, "", iv, "kl")])
                continue
            if "each" in modes:
                jobs.append([rows(site, "10", iv, "kl"),
                             *(rows(site, "10", "decomposition", m) for m in GEOMETRY_METRICS)])
            if "set" in modes or iv in HOSTS:
                jobs.append([rows(site, "6,8,10", iv, "kl")])
            if "from" in modes:
                jobs.append([rows(site, ",".join(map(str, range(L, n))), iv, "kl") for L in (8, 10)])
        jobs.append([rows(site, str(L), ATTENTION, m) for m in ATTENTION_METRICS for L in (8, 10)])
    jobs.append([rows("p_last", "14" if c in ("additive", "remove_x") else "", c, m)
                 for c in MARKER_CONDITIONS for m in ("marker_any", "marker_distinct")])
    keys = Keys(source="lac's logging code")
    for job in jobs:
        summary = summarize(frame(job))
        keys.summary |= set(summary_keys(summary)) | set(layer_free_keys(summary))
        for r in history_rows(summary, n_layers=n):
            keys.history |= set(r)
    keys.history |= {"results", "generations"}  # the tables are logged as history rows (run.log)
    keys.summary |= keys.history  # W&B's summary holds each history key's last value
    config = {"model": {"name": "m", "id": "m", "n_layers": n}, "grid": {"name": "g"},
              "site": {"name": "s", "sites": ["p_last"]}, "intervention": {"name": "i", "layers": None},
              "mode": "kl", "layer": 10}
    keys.config |= set(group_keys(config))
    return keys


_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32 * 1024


def _records(path: Path) -> Iterable[bytes]:
    """The records of a .wandb file (wandb's LevelDB-style log: 32 KiB blocks of crc'd chunks)."""
    buf = Path(path).read_bytes()
    if len(buf) < _HEADER.size or _HEADER.unpack_from(buf, 0)[0] != b":W&B":
        raise ValueError(f"{path}: not a .wandb file")
    pos, pending = _HEADER.size, bytearray()
    while pos < len(buf):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:
            pos += left
            continue
        if pos + _CHUNK.size > len(buf):
            break
        crc, length, kind = _CHUNK.unpack_from(buf, pos)
        data = buf[pos + _CHUNK.size : pos + _CHUNK.size + length]
        pos += _CHUNK.size + length
        if len(data) != length or zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            break  # a run still being written: keep what is whole
        if kind == 1:
            yield bytes(data)
        elif kind == 2:
            pending = bytearray(data)
        elif kind in (3, 4):
            pending += data
            if kind == 4:
                yield bytes(pending)


def _item_key(item: Any) -> str:
    return "/".join(item.nested_key) if len(item.nested_key) else item.key


def read_offline_run(path: Path) -> tuple[str, Keys]:
    """(group, keys) of one offline run: its .wandb file's run, config, summary and history records."""
    from wandb.proto import wandb_internal_pb2 as pb

    keys, group = Keys(runs=1, source=str(path)), ""
    for raw in _records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            group = rec.run.run_group
            keys.config |= {_item_key(i) for i in rec.run.config.update}
            keys.summary |= {_item_key(i) for i in rec.run.summary.update}
        elif kind == "config":
            keys.config |= {_item_key(i) for i in rec.config.update}
        elif kind == "summary":
            keys.summary |= {_item_key(i) for i in rec.summary.update}
        elif kind == "history":
            row = {_item_key(i) for i in rec.history.item if not _item_key(i).startswith("_")}
            keys.history |= row
            keys.summary |= row
    keys.config -= {"_wandb"}
    return group, keys


def offline_keys(paths: Sequence[Path | str], group: str | None) -> tuple[Keys, set[str]]:
    """Keys of the offline runs under `paths` (in `group`, when given), and the groups seen."""
    keys, groups = Keys(source=", ".join(map(str, paths))), set()
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(p.rglob("*.wandb"))
        for f in files:
            try:
                g, k = read_offline_run(f)
            except (OSError, ValueError) as e:
                print(f"lac.dashboard: warning: skipped unreadable run {f} ({e})", file=sys.stderr)
                continue
            groups.add(g)
            if group is None or g == group:
                keys.add(k)
    return keys, groups


def online_keys(entity: str, project: str, group: str | None) -> Keys:
    """Keys of the project's runs in `group`, listed with W&B's API (network and a key needed)."""
    import wandb

    api = wandb.Api(timeout=30)
    filters = {"group": group} if group else {}
    try:
        runs = list(api.runs(f"{entity}/{project}", filters=filters, per_page=200))
    except Exception as e:
        raise DashboardError(
            f"W&B could not list the runs of {entity}/{project}"
            f"{f' in group {group!r}' if group else ''}: {type(e).__name__}: {e}"
        ) from e
    keys = Keys(source=f"W&B {entity}/{project}")
    for run in runs:
        keys.runs += 1
        keys.summary |= {k for k in run.summary.keys() if not k.startswith("_")}
        keys.config |= {k for k in run.config if not k.startswith("_")}
        history = getattr(run, "history_keys", None) or {}
        keys.history |= {k for k in (history.get("keys") or {}) if not k.startswith("_")}
    return keys


# --------------------------------------------------------------------------- workspace


def _order(values: Iterable[str], first: Sequence[str]) -> list[str]:
    return sorted(set(values), key=lambda v: (first.index(v) if v in first else len(first), v))


def plan(keys: Keys, x: str = "frac") -> list[tuple[str, list[dict[str, Any]]]]:
    """The workspace as data: [(section, [panel spec])], each panel naming only keys in `keys`.
    A panel spec: {"kind": "line"|"bar", "title", "x", "y": [...], "groupby": config key}."""
    xkey = X_KEYS[x] if X_KEYS[x] in keys.history else "layer"
    known: set[str] = set()
    by_layer: dict[tuple[str, str, str], str] = {}  # (family, site, intervention or "") -> key
    for k in keys.history:
        parts = k.split("/")
        if parts[0] != HISTORY or parts[-1] != "median":
            continue
        if parts[1] == "kl" and len(parts) == 5:
            by_layer[("kl", parts[2], parts[3])] = k
        elif parts[1] in (*GEOMETRY_METRICS, *ATTENTION_METRICS) and len(parts) == 4:
            by_layer[(parts[1], parts[2], "")] = k
    sites = _order((s for _, s, _ in by_layer), SITES)

    def line(title: str, y: str, ylabel: str, log: bool = False) -> dict[str, Any]:
        known.add(y)
        return {"kind": "line", "title": title, "x": xkey, "y": [y], "groupby": GROUP_BY,
                "log_y": log, "title_x": "layer / depth" if xkey == "layer_frac" else "layer",
                "title_y": ylabel}

    def bar(title: str, ys: list[str], groupby: str = GROUP_BY) -> dict[str, Any] | None:
        ys = [y for y in ys if y in keys.summary]
        known.update(ys)
        return {"kind": "bar", "title": title, "y": ys, "groupby": groupby} if ys else None

    sections: list[tuple[str, list[dict[str, Any]]]] = []
    main_ivs = (*KL_ORDER, "host_oracle", "host_additive")

    def mechanism_arm(iv: str) -> bool:  # host_* controls, kv / knockout, any "from L" curve
        return iv in MECHANISM_ORDER or iv.endswith(FROM_SUFFIX) or (iv.startswith("host_") and iv not in main_ivs)

    kl_ivs = _order((iv for f, _, iv in by_layer if f == "kl" and iv in main_ivs), main_ivs)
    control_ivs = _order((iv for f, _, iv in by_layer if f == "kl" and iv not in main_ivs and not mechanism_arm(iv)),
                         CONTROL_LAYERED)
    mechanism_ivs = _order((iv for f, _, iv in by_layer if f == "kl" and mechanism_arm(iv)), MECHANISM_ORDER)
    kl = [line(f"KL · {site} · {iv}", by_layer[("kl", site, iv)], "median KL (nats)", log=True)
          for iv in kl_ivs for site in sites if ("kl", site, iv) in by_layer]
    geo = [line(f"{m} · {site}", by_layer[(m, site, "")], f"median {m}")
           for m in GEOMETRY_METRICS for site in sites if (m, site, "") in by_layer]
    markers = [p for p in (
        bar("any-marker rate by condition", [f"markers/{c}/any_rate" for c in _order(
            (k.split("/")[1] for k in keys.summary if re.fullmatch(r"markers/[^/]+/any_rate", k)),
            MARKER_CONDITIONS)]),
        bar("mean distinct markers by condition", [f"markers/{c}/distinct_mean" for c in _order(
            (k.split("/")[1] for k in keys.summary if re.fullmatch(r"markers/[^/]+/distinct_mean", k)),
            MARKER_CONDITIONS)]),
        bar("swap: any-marker rate of the partner persona X'", [  # the same texts, scored with X''s markers
            k for k in sorted(keys.summary) if re.fullmatch(r"markers/[^/]+/any_rate_partner", k)]),
    ) if p]
    host = [p for iv in HOSTS for site in _order(
        (k.split("/")[1] for k in keys.summary if re.fullmatch(rf"kl/[^/]+/{iv}/median", k)), SITES)
        if (p := bar(f"KL · {site} · {iv} by layer set", [f"kl/{site}/{iv}/median"], groupby="layers"))]
    controls = [line(f"KL · {site} · {iv}", by_layer[("kl", site, iv)], "median KL (nats)", log=True)
                for iv in control_ivs for site in sites if ("kl", site, iv) in by_layer]
    controls += [p for site in SITES if (p := bar(
        f"KL · {site} · no vector written", [f"kl/{site}/none/{iv}/median" for iv in NO_VECTOR]))]

    def arm_title(iv: str) -> str:
        return f"{iv.removesuffix(FROM_SUFFIX)} (from L, x = L)" if iv.endswith(FROM_SUFFIX) else iv

    mechanism = [line(f"KL · {site} · {arm_title(iv)}", by_layer[("kl", site, iv)], "median KL (nats)", log=True)
                 for iv in mechanism_ivs for site in sites if ("kl", site, iv) in by_layer]
    mechanism += [line(f"attention mass on the persona span · {site} · {m}", by_layer[(m, site, "")],
                       f"median {m}") for m in ATTENTION_METRICS for site in sites if (m, site, "") in by_layer]
    mechanism += [p for site in SITES if (p := bar(
        f"KL · {site} · references (nothing written)",
        [f"kl/{site}/none/{iv}/median" for iv in MECHANISM_REFERENCES]))]
    for name, panels in (("KL by layer", kl), ("Geometry by layer", geo), ("Markers", markers),
                         ("Host injection", host), ("Controls", controls), ("Controls and mechanism", mechanism)):
        if panels:
            sections.append((name, panels))
    other = _other(keys, known, xkey)
    if other:
        sections.append(("Other results", other))
    return sections


_KNOWN = [
    re.compile(p) for p in (
        r"kl/[^/]+/(L[0-9+]+|none)/[^/]+/[^/]+",  # per-layer / per-set summary keys
        r"kl/[^/]+/[^/]+/[^/]+",  # layer-free KL (shown by layer in history, or as host/controls)
        rf"({'|'.join((*GEOMETRY_METRICS, *ATTENTION_METRICS))})/[^/]+(/L\d+)?/[^/]+",
        r"markers/[^/]+/(any_rate|distinct_mean)(_partner)?",
        rf"{HISTORY}/.*", r"layer", r"layer_frac", r"results", r"generations",
    )
]


def _other(keys: Keys, known: set[str], xkey: str) -> list[dict[str, Any]]:
    """Panels for keys none of lac's sections shows (new results): history keys as lines
    against the layer, summary numbers as bars per model. Spreads (p25, p75, min, max) left out."""
    panels: list[dict[str, Any]] = []
    for k in sorted(keys.history - known):
        if k.startswith(f"{HISTORY}/") and not _STAT.search(k) and not any(
            k == f"{HISTORY}/kl/{s}" for s in SITES
        ):
            parts = k.split("/")
            if parts[1] == "kl" or parts[1] in (*GEOMETRY_METRICS, *ATTENTION_METRICS):
                continue  # p25/p75 of the plotted families
            panels.append({"kind": "line", "title": k.removeprefix(f"{HISTORY}/"), "x": xkey, "y": [k],
                           "groupby": GROUP_BY, "log_y": False, "title_x": xkey, "title_y": k})
    for k in sorted(keys.summary - known - keys.history):
        if k.startswith("_") or _STAT.search(k) or any(p.fullmatch(k) for p in _KNOWN):
            continue
        panels.append({"kind": "bar", "title": k, "y": [k], "groupby": GROUP_BY})
    return panels


def build_workspace(sections: list[tuple[str, list[dict[str, Any]]]], *, entity: str, project: str,
                    group: str | None, name: str | None = None) -> Any:
    """The wandb_workspaces Workspace of a :func:`plan`: runs filtered to the group, grouped by model."""
    import warnings

    with warnings.catch_warnings():  # wandb-workspaces' own pydantic-v1 deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr

    def panel(p: dict[str, Any]) -> Any:
        if p["kind"] == "line":
            return wr.LinePlot(title=p["title"], x=p["x"], y=list(p["y"]), groupby=wr.Config(p["groupby"]),
                               log_y=p.get("log_y") or None, title_x=p.get("title_x"),
                               title_y=p.get("title_y"))
        return wr.BarPlot(title=p["title"], metrics=list(p["y"]), groupby=wr.Config(p["groupby"]),
                          orientation="v")

    runset = ws.RunsetSettings(
        groupby=[expr.Config(GROUP_BY)],
        filters=expr.And(expr.Metric("Group") == group) if group else "",
    )
    return ws.Workspace(
        entity=entity, project=project, name=name or f"lac · {group or project}",
        sections=[ws.Section(name=s, panels=[panel(p) for p in ps], is_open=True) for s, ps in sections],
        runset_settings=runset,
    )


def workspace_json(workspace: Any) -> dict[str, Any]:
    """The view as W&B stores it (the body `Workspace.save()` sends)."""
    model = workspace._to_model()
    return json.loads(model.model_dump_json(by_alias=True, exclude_none=True))


def panel_keys(view: dict[str, Any]) -> list[tuple[str, str, dict[str, list[str]]]]:
    """(section, panel title, {"x": [...], "y": [...], "groupby": [...]}) of every panel of a view's
    JSON: the keys a check against real runs needs."""
    out = []
    for sec in view["spec"]["section"]["panelBankConfig"]["sections"]:
        for p in sec["panels"]:
            c = p.get("config", {})
            groupby = c.get("groupBy")
            out.append((sec["name"], c.get("chartTitle", ""), {
                "x": [c["xAxis"]] if c.get("xAxis") else [],
                "y": list(c.get("metrics", [])),
                "groupby": [groupby.removesuffix(".value")] if groupby else [],
            }))
    return out


# --------------------------------------------------------------------------- CLI


def _online() -> bool:
    from lac.tracking import api_key_source

    mode = (os.environ.get("WANDB_MODE") or "").strip().lower()
    return mode not in ("offline", "dryrun", "disabled") and api_key_source() is not None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lac.dashboard", description=__doc__.split("\n\n")[0])
    ap.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"), help="W&B entity ($WANDB_ENTITY)")
    ap.add_argument("--project", default=os.environ.get("WANDB_PROJECT") or "lac",
                    help="W&B project ($WANDB_PROJECT, else lac)")
    ap.add_argument("--group", default=os.environ.get("WANDB_RUN_GROUP"),
                    help="only runs of this group (a sweep's sweep_name)")
    ap.add_argument("--runs", nargs="+", type=Path, default=None,
                    help="offline run folders (e.g. $WANDB_DIR or multirun dirs): take the keys from them")
    ap.add_argument("--x", choices=tuple(X_KEYS), default="frac",
                    help="x of the by-layer plots: layer / depth (default) or the absolute layer")
    ap.add_argument("--out", type=Path, default=None, help="where to write the view's JSON")
    ap.add_argument("--name", default=None, help="workspace name")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="only write the JSON (default offline)")
    mode.add_argument("--save", action="store_true", help="save the workspace to W&B (default online)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err = sys.stderr
    if not args.entity:
        print("lac.dashboard: no entity: give --entity E (or set WANDB_ENTITY)", file=err)
        return 2
    online = _online()
    where = f"{args.entity}/{args.project}" + (f", group {args.group!r}" if args.group else "")
    try:
        if args.runs:
            keys, groups = offline_keys(args.runs, args.group)
            if not keys.runs:
                seen = ", ".join(sorted(repr(g) for g in groups)) or "none"
                raise DashboardError(f"no runs{f' in group {args.group!r}' if args.group else ''} under "
                                     f"{', '.join(map(str, args.runs))} (groups found: {seen}); nothing written")
        elif online:
            keys = online_keys(args.entity, args.project, args.group)
            if not keys.runs:
                raise DashboardError(f"no runs in {where}; nothing written or saved")
        else:
            keys = catalogue()
    except DashboardError as e:
        print(f"lac.dashboard: {e}", file=err)
        return 1 if online and not args.runs and "could not list" in str(e) else 2
    sections = plan(keys, args.x)
    workspace = build_workspace(sections, entity=args.entity, project=args.project, group=args.group,
                                name=args.name)
    out = args.out or Path(f"wandb-workspace-{args.project}-{args.group or 'all'}.json")
    view = workspace_json(workspace)
    try:
        if out.is_dir():
            raise IsADirectoryError(21, "is a folder; give a file name, e.g. DIR/workspace.json")
        if why := unwritable(out.parent):
            raise OSError(why)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(view, indent=1) + "\n"))
    except OSError as e:
        print(f"lac.dashboard: --out {out}: {e.strerror or e}; nothing written", file=err)
        return 2
    n = sum(len(p) for _, p in sections)
    print(f"lac.dashboard: workspace for {where}: {len(sections)} sections, {n} panels, keys from "
          f"{keys.source}" + (f" ({keys.runs} runs)" if keys.runs else ""))
    for name, panels in sections:
        print(f"  {name}: {len(panels)} panels")
    print(f"lac.dashboard: wrote {out}")
    save = args.save or (online and not args.dry_run)
    if not save:
        why = "--dry-run" if args.dry_run else "W&B is offline (no API key, or WANDB_MODE=offline)"
        print(f"lac.dashboard: not saved ({why}); save it with the same command and --save, online")
        return 0
    if not online:
        print(f"lac.dashboard: --save needs W&B online with an API key (WANDB_API_KEY or `wandb login`; "
              f"WANDB_MODE={os.environ.get('WANDB_MODE') or 'unset'}); the workspace JSON is in {out}",
              file=err)
        return 2
    try:
        workspace.save()
    except Exception as e:
        print(f"lac.dashboard: W&B did not save the workspace for {where}: {type(e).__name__}: {e} "
              f"(the JSON is in {out})", file=err)
        return 1
    print(f"lac.dashboard: saved {workspace.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

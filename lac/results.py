"""Tidy results: rows, summaries, atomic files, and the per-key job store that makes sweeps resumable.

A job's content key (lac.config.job_key) names a stable folder under
results_root. Each predict batch of cells lands there as one part file
(written to a temp name, then renamed: a killed job leaves whole parts or
nothing). A rerun reads the parts, skips their cells, and finishes the rest;
a finished folder is recognised by its `done.json`, written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lac.errors import LacError
from lac.io import atomic_write_bytes, atomic_write_json, locked, remove_stale_tmp
from lac.schema import COLUMNS, DECOMPOSITION, OLDER_DEFAULTS, SCHEMA_VERSION, condition_label
from lac.stats import describe as cell_stats
from lac.stats import layers_key

if TYPE_CHECKING:  # pandas (~0.5 s to import) loads when rows exist, beside the compute (lac.runner)
    import pandas as pd

log = logging.getLogger("lac.results")


def frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows (dicts with the schema's columns, minus `schema`) as a typed DataFrame."""
    import pandas as pd

    df = pd.DataFrame(list(rows), columns=[c for c in COLUMNS if c != "schema"])
    for col in ("factor", "partner"):  # "": about the whole design / no swap partner
        df[col] = ["" if not isinstance(v, str) else v for v in df[col]]
    df["schema"] = SCHEMA_VERSION
    return df.astype(COLUMNS)


def current_schema(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of an older results schema (every row of one file) with the columns it lacks at their
    defaults (lac.schema.OLDER_DEFAULTS), so jobs of any lac line up; rows of this schema unchanged."""
    if "schema" not in df or not (df["schema"] < SCHEMA_VERSION).all():
        return df
    return df.assign(**{c: v for c, v in OLDER_DEFAULTS.items() if c not in df.columns}, schema=SCHEMA_VERSION)


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """Medians/IQRs over cells per metric x site x layer(s) x intervention; marker rates; and, when the
    job recorded them (attn_persona=true), the attention mass on the persona span per metric x site x layer."""
    from lac.schema import ATTENTION, ATTENTION_METRICS

    out: dict[str, Any] = {"kl": [], "geometry": [], "markers": {}}
    df = df.assign(intervention=[condition_label(i, f) for i, f in zip(df["intervention"], df["factor"], strict=True)])
    for metric in ("kl", "kl_partner"):  # kl_partner: swap's KL to the partner prompt X'Y
        kl = df[df.metric == metric]
        if metric != "kl" and kl.empty:
            continue
        groups = sorted(kl.groupby(["site", "layers", "intervention"], sort=False),
                        key=lambda t: (t[0][0], layers_key(t[0][1]), t[0][2]))  # layers as numbers: 6 < 10
        out[metric] = [{"site": site, "layers": layers, "intervention": iv, **cell_stats(g.value.to_numpy()),
                        **_dose(g)} for (site, layers, iv), g in groups]
    geo = df[df.intervention == DECOMPOSITION]
    for (metric, factor, site, layer), g in geo.groupby(["metric", "factor", "site", "layer"], sort=True):
        r = {"metric": metric, "site": site, "layer": int(layer), **cell_stats(g.value.to_numpy())}
        out["geometry"].append({**r, "factor": factor} if factor else r)
    att = df[(df.intervention == ATTENTION) & df.metric.isin(ATTENTION_METRICS)]
    if not att.empty:  # only then: summaries of jobs without attention rows keep their shape
        out["attention"] = [
            {"metric": metric, "site": site, "layer": int(layer), **cell_stats(g.value.to_numpy())}
            for (metric, site, layer), g in sorted(att.groupby(["metric", "site", "layer"], sort=False),
                                                   key=lambda t: (ATTENTION_METRICS.index(t[0][0]), t[0][1], t[0][2]))
        ]
    mk = df[df.metric.isin(["marker_any", "marker_distinct", "marker_any_partner", "marker_distinct_partner"])]
    for iv, g in mk.groupby("intervention", sort=False):
        any_ = g[g.metric == "marker_any"]
        dist = g[g.metric == "marker_distinct"]
        out["markers"][iv] = {
            "any_rate": float(any_.value.mean()),
            "any_cells": int(any_.value.sum()),
            "cells": int(len(any_)),
            "distinct_mean": float(dist.value.mean()),
            "per_persona": {p: int(v) for p, v in any_.groupby("persona").value.sum().items()},
            **_dose(g),
        }
        partner = g[g.metric == "marker_any_partner"]  # swap: the same texts scored with X''s markers
        if len(partner):
            out["markers"][iv] |= {"any_rate_partner": float(partner.value.mean()),
                                   "any_cells_partner": int(partner.value.sum()),
                                   "distinct_mean_partner": float(g[g.metric == "marker_distinct_partner"].value.mean())}
    return out


def _dose(rows: pd.DataFrame) -> dict[str, float]:
    """{"alpha": a} for the rows of a steer / steer_host job (one dose per job), else {}."""
    alphas = rows["alpha"].dropna().unique() if "alpha" in rows else []
    return {"alpha": float(alphas[0])} if len(alphas) == 1 else {}


def summary_keys(summary: dict[str, Any]) -> dict[str, float]:
    """Flat, stable metric names for trackers: kl/p_last/L14/additive/median, cos_xy_sum/g1/L10/median,
    attn_persona/p_last/L10/median (a layer set: kl/p_last/L10+11+12/kv_persona/median; none: kl/p_last/none/...)."""
    flat: dict[str, float] = {}
    for metric in ("kl", "kl_partner"):
        for r in summary.get(metric, []):
            layers = f"L{r['layers'].replace(',', '+')}" if r["layers"] else "none"
            for s in ("median", "p25", "p75", "min", "max"):
                flat[f"{metric}/{r['site']}/{layers}/{r['intervention']}/{s}"] = r[s]
    for r in summary.get("geometry", []):
        factor = f"{r['factor']}/" if r.get("factor") else ""
        for s in ("median", "p25", "p75"):
            flat[f"{r['metric']}/{factor}{r['site']}/L{r['layer']}/{s}"] = r[s]
    for r in summary.get("attention", []):
        for s in ("median", "p25", "p75"):
            flat[f"{r['metric']}/{r['site']}/L{r['layer']}/{s}"] = r[s]
    for iv, r in summary.get("markers", {}).items():
        for k in ("any_rate", "distinct_mean", "any_rate_partner", "distinct_mean_partner"):
            if k in r:
                flat[f"markers/{iv}/{k}"] = r[k]
    return flat


def format_table(summary: dict[str, Any]) -> str:
    """The console table: per site x layer, median KL [p25, p75] and median geometry; attention mass
    on the persona span per site x layer when the job recorded it. A run of 3+ consecutive layers (a
    "from L" set) shows as "10..23"."""
    from lac.schema import ATTENTION_METRICS

    def shown_layers(layers: str) -> str:
        ls = [int(p) for p in layers.split(",") if p.strip()] if layers else []
        if len(ls) >= 3 and ls == list(range(ls[0], ls[-1] + 1)):
            return f"{ls[0]}..{ls[-1]}"
        return layers or "-"

    geo = {(r["site"], str(r["layer"]), r["metric"]): r["median"] for r in summary.get("geometry", [])
           if not r.get("factor")}
    for k, v in list(geo.items()):  # k >= 3 factors: cos(h_all - h_{}, sum D_f) in the paper's column
        if k[2] == "cos_all_sum":
            geo[(k[0], k[1], "cos_xy_sum")] = v
    partner = {(r["site"], r["layers"], r["intervention"]): r for r in summary.get("kl_partner", [])}
    lines = []
    if summary.get("kl"):
        lines.append(f"{'site':<12} {'layers':<10} {'intervention':<17} {'KL median [p25, p75]':<28} "
                     f"{'cos(dXY,dX+dY)':>14} {'cos(dX,dY)':>10} {'|I|/|dXY|':>9}")
        for r in sorted(summary["kl"], key=lambda r: (r["site"], layers_key(r["layers"]), r["intervention"])):
            g = [geo.get((r["site"], r["layers"], m)) for m in ("cos_xy_sum", "cos_x_y", "inter_ratio")]
            gs = " ".join(f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}" for v, w in zip(g, (14, 10, 9), strict=True))
            kl = f"{r['median']:.4f} [{r['p25']:.4f}, {r['p75']:.4f}]"
            name = f"{r['intervention']} a={r['alpha']:g}" if "alpha" in r else r["intervention"]
            lines.append(f"{r['site']:<12} {shown_layers(r['layers']):<10} {name:<17} {kl:<28} {gs}")
            p = partner.get((r["site"], r["layers"], r["intervention"]))
            if p:
                kl = f"{p['median']:.4f} [{p['p25']:.4f}, {p['p75']:.4f}]"
                lines.append(f"{'':<12} {'':<10} {'  vs partner':<17} {kl:<28}")
    if summary.get("attention"):
        att = {(r["site"], r["layer"], r["metric"]): r for r in summary["attention"]}
        shown = [m for m in ATTENTION_METRICS if any(k[2] == m for k in att)]
        lines.append(f"{'site':<12} {'layer':<6} " + " ".join(f"{m + ' median':>30}" for m in shown))
        for site, layer in sorted({(k[0], k[1]) for k in att}):
            cells = []
            for m in shown:
                r = att.get((site, layer, m))
                cells.append(f"{r['median']:.3f} [{r['p25']:.3f}, {r['p75']:.3f}]" if r else "-")
            lines.append(f"{site:<12} {layer:<6} " + " ".join(f"{c:>30}" for c in cells))
    if summary.get("markers"):
        names = {iv: f"{iv} a={r['alpha']:g}" if "alpha" in r else iv for iv, r in summary["markers"].items()}
        w = max(14, *map(len, names.values()))  # knockout_persona_from is 21 wide
        lines.append(f"{'condition':<{w}} {'any-marker rate':>16} {'cells':>9} {'mean distinct':>14}")
        for iv, r in summary["markers"].items():
            lines.append(f"{names[iv]:<{w}} {r['any_rate']:>16.3f} {r['any_cells']:>4}/{r['cells']:<4} "
                         f"{r['distinct_mean']:>14.2f}")
            if "any_rate_partner" in r:  # swap: the markers of the partner persona X' in the same texts
                lines.append(f"{'  of partner':<{w}} {r['any_rate_partner']:>16.3f} {r['any_cells_partner']:>4}/"
                             f"{r['cells']:<4} {r['distinct_mean_partner']:>14.2f}")
    return "\n".join(lines)


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checked(path: Path, sha256: str | None) -> bytes:
    """A file's bytes if its SHA-256 is the one recorded with it; ValueError otherwise."""
    data = Path(path).read_bytes()
    if sha256 is None or _sha(data) != sha256:
        raise ValueError(f"checksum mismatch (recorded {str(sha256)[:12]}, found {_sha(data)[:12]})")
    return data


class JobStore:
    """The stable folder of one job key: parts, final files, and a lock against twin jobs.

    Every part and final file is written with its SHA-256 (in the part's record,
    in done.json); a file that fails its checksum or cannot be read is dropped
    with a warning and its cells recomputed, never used. A finished job whose
    final files are bad is rebuilt from its parts. `staging=True` is the folder a
    `rerun=true` job computes into; `publish` swaps it in for the old results.
    """

    def __init__(self, root: Path, key: str, *, staging: bool = False):
        self.root = Path(root)
        self.key = key
        self.final_dir = self.root / key
        self.dir = self.root / f".rerun-{key}" if staging else self.final_dir
        self.parts = self.dir / "parts"
        self.claimed = False  # set by claim: the folder is this job's to discard if it fails empty

    @property
    def done(self) -> bool:
        """Finished, with final files that pass their checksums (else they are removed: rebuild)."""
        record = self.dir / "done.json"
        if not record.is_file():
            return False
        try:
            info = json.loads(record.read_text())
            for name, sha in info["files"].items():
                read_checked(self.dir / name, sha)
            import pandas as pd

            pd.read_parquet(self.dir / "results.parquet")
            return True
        except Exception as e:
            log.warning("finished job %s has a bad final file (%s: %s); rebuilding it from its parts",
                        self.dir, type(e).__name__, e)
            for name in ("done.json", "results.parquet", "summary.json", "generations.jsonl"):
                (self.dir / name).unlink(missing_ok=True)
            return False

    def claim(self, config: dict[str, Any]) -> None:
        """Bind the folder to this key's config; refuse a folder written for another config."""
        own = self.dir / "config.json"
        if own.is_file():
            found = json.loads(own.read_text())
            if found.get("key") != self.key:
                raise LacError(
                    f"results folder {self.dir} belongs to config key {found.get('key')!r}, not {self.key!r}; "
                    "refusing to overwrite it (choose another results_root or remove the folder)"
                )
        self.parts.mkdir(parents=True, exist_ok=True)
        for folder in (self.dir, self.parts, self.dir / "tracked"):
            remove_stale_tmp(folder)
        # a publish killed between its two renames left the replaced results here; the key's lock
        # (held by every caller of claim) means no live publish of this key owns one
        for old in self.root.glob(f".old-{self.key}-*"):
            log.info("removing %s, left by a rerun killed while it published", old)
            shutil.rmtree(old, ignore_errors=True)
        if not own.is_file():
            atomic_write_json(own, {"key": self.key, "config": config})
        self.claimed = True

    def discard_if_empty(self) -> None:
        """A job that failed before computing anything leaves no folder behind; only a folder it claimed
        (one `claim` refused belongs to someone else, whatever it holds)."""
        if not self.claimed:
            return
        if self.dir.is_dir() and not (self.dir / "done.json").exists() and not self.has_parts():
            shutil.rmtree(self.dir, ignore_errors=True)

    @contextmanager
    def lock(self, timeout: float = -1) -> Iterator[None]:
        """Exclusive for the job's lifetime: a twin job waits (and says so), then finds the work done.
        The lock file lives outside the job folder, so publishing a rerun cannot move it."""
        with locked(self.root / ".locks" / f"{self.key}.lock", timeout=timeout, what=f"job {self.key}"):
            yield

    def has_parts(self) -> bool:
        """Any part written yet (a fresh job reads none, and needs no pandas to start)."""
        return self.parts.is_dir() and any(self.parts.glob("*.parquet"))

    def read_parts(self) -> tuple[pd.DataFrame, list[dict[str, Any]], set[str]]:
        """Rows, generation records and cell keys of every part that passes its checksum."""
        import pandas as pd

        frames, gens, cells = [], [], set()
        for p in sorted(self.parts.glob("*.parquet")):
            meta = p.with_suffix(".json")
            try:
                info = json.loads(meta.read_text())
                df = pd.read_parquet(io.BytesIO(read_checked(p, info.get("sha256"))))
                if set(df.columns) != set(COLUMNS):
                    raise ValueError(f"written under another results schema (this lac writes schema {SCHEMA_VERSION})")
                if info.get("rows") != len(df):
                    raise ValueError("its row count does not match its record")
            except Exception as e:  # a part we cannot trust is recomputed, never used
                log.warning("dropping unreadable result part %s (%s); its cells will be recomputed", p, e)
                p.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                continue
            frames.append(df)
            gens.extend(info.get("generations", []))
            cells.update(info["cells"])
        for meta in self.parts.glob("*.json"):  # a record whose parquet never landed
            if not meta.with_suffix(".parquet").exists():
                meta.unlink(missing_ok=True)
        df = pd.concat(frames, ignore_index=True) if frames else frame([])
        return df, gens, cells

    def write_part(self, name: str, df: pd.DataFrame, cells: list[str], generations: list[dict] | None = None) -> None:
        """Parquet first, then its record with the parquet's SHA-256: a part without a record is not trusted."""
        data = parquet_bytes(df)
        atomic_write_bytes(self.parts / f"{name}.parquet", data)
        atomic_write_json(self.parts / f"{name}.json",
                          {"cells": cells, "rows": len(df), "sha256": _sha(data), "generations": generations or []})

    def finish(self, df: pd.DataFrame, summary: dict[str, Any], generations: list[dict]) -> None:
        """Final files, then done.json with their checksums, written last."""
        files = {"results.parquet": parquet_bytes(df),
                 "summary.json": (json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n").encode()}
        if generations:
            files["generations.jsonl"] = "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations).encode()
        for name, data in files.items():
            atomic_write_bytes(self.dir / name, data)
        atomic_write_json(self.dir / "done.json", {"key": self.key, "rows": len(df),
                                                   "files": {n: _sha(d) for n, d in files.items()}})

    @property
    def reruns(self) -> int:
        """How many `rerun=true` jobs replaced this key's results (`rerun.json`; 0 without one)."""
        try:
            return int(json.loads((self.dir / "rerun.json").read_text())["reruns"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def publish(self, reruns: int = 0) -> None:
        """Swap a finished staging folder in for the old results (rerun=true), recording how many reruns
        the results are. Between the two renames no folder holds the key, so a crash there means
        recompute, never stale results."""
        if self.dir == self.final_dir:
            return
        if reruns:
            atomic_write_json(self.dir / "rerun.json", {"reruns": reruns})
        old = self.root / f".old-{self.key}-{os.getpid()}"
        if self.final_dir.exists():
            os.replace(self.final_dir, old)
        os.replace(self.dir, self.final_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.dir, self.parts = self.final_dir, self.final_dir / "parts"

    def _marks(self, run_id: str) -> list[dict[str, Any]] | None:
        """Where a run was logged ({project, entity, where} each); [] for a marker from before lac recorded
        projects; None for no (or an unreadable) marker: log the run again rather than never."""
        try:
            return json.loads((self.dir / "tracked" / f"{run_id}.json").read_text()).get("logged", [])
        except (OSError, ValueError):
            return None

    def tracked(self, run_id: str, dest: tuple[str | None, str | None] | None = None) -> bool:
        """Whether this run was logged (to W&B project/entity `dest`: the same job logged to another
        project is a run of its own there). A marker from before lac recorded projects counts for any."""
        marks = self._marks(run_id)
        if marks is None:
            return False
        return dest is None or not marks or [*dest] in [[e.get("project"), e.get("entity")] for e in marks]

    def mark_tracked(self, run_id: str, where: str | None, dest: tuple[str | None, str | None] = (None, None)) -> None:
        """Written once the job's W&B run is finished: a rerun logs any run that is not marked."""
        logged = [*(self._marks(run_id) or []), {"project": dest[0], "entity": dest[1], "where": where}]
        atomic_write_json(self.dir / "tracked" / f"{run_id}.json", {"run_id": run_id, "where": where, "logged": logged})

"""Tidy results: rows, summaries, atomic files, and the per-key job store that makes sweeps resumable.

A job's content key (lac.config.job_key) names a stable folder under
results_root. Each predict batch of cells lands there as one part file
(written to a temp name, then renamed: a killed job leaves whole parts or
nothing). A rerun reads the parts, skips their cells, and finishes the rest;
a finished folder is recognised by its `done.json`, written last.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from lac.metrics import summarize as cell_stats
from lac.schema import COLUMNS, DECOMPOSITION, SCHEMA_VERSION

log = logging.getLogger("lac.results")


def frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows (dicts with the schema's columns, minus `schema`) as a typed DataFrame."""
    df = pd.DataFrame(list(rows), columns=[c for c in COLUMNS if c != "schema"])
    df["schema"] = SCHEMA_VERSION
    return df.astype(COLUMNS)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """Medians/IQRs over cells per metric x site x layer(s) x intervention; marker rates."""
    out: dict[str, Any] = {"kl": [], "geometry": [], "markers": {}}
    kl = df[df.metric == "kl"]
    for (site, layers, iv), g in kl.groupby(["site", "layers", "intervention"], sort=True):
        out["kl"].append({"site": site, "layers": layers, "intervention": iv, **cell_stats(g.value.to_numpy())})
    geo = df[df.intervention == DECOMPOSITION]
    for (metric, site, layer), g in geo.groupby(["metric", "site", "layer"], sort=True):
        out["geometry"].append({"metric": metric, "site": site, "layer": int(layer), **cell_stats(g.value.to_numpy())})
    mk = df[df.metric.isin(["marker_any", "marker_distinct"])]
    for iv, g in mk.groupby("intervention", sort=False):
        any_ = g[g.metric == "marker_any"]
        dist = g[g.metric == "marker_distinct"]
        out["markers"][iv] = {
            "any_rate": float(any_.value.mean()),
            "any_cells": int(any_.value.sum()),
            "cells": int(len(any_)),
            "distinct_mean": float(dist.value.mean()),
            "per_persona": {p: int(v) for p, v in any_.groupby("persona").value.sum().items()},
        }
    return out


def summary_keys(summary: dict[str, Any]) -> dict[str, float]:
    """Flat, stable metric names for trackers: kl/p_last/L14/additive/median, cos_xy_sum/g1/L10/median."""
    flat: dict[str, float] = {}
    for r in summary.get("kl", []):
        layers = f"L{r['layers'].replace(',', '+')}" if r["layers"] else "none"
        for s in ("median", "p25", "p75", "min", "max"):
            flat[f"kl/{r['site']}/{layers}/{r['intervention']}/{s}"] = r[s]
    for r in summary.get("geometry", []):
        for s in ("median", "p25", "p75"):
            flat[f"{r['metric']}/{r['site']}/L{r['layer']}/{s}"] = r[s]
    for iv, r in summary.get("markers", {}).items():
        flat[f"markers/{iv}/any_rate"] = r["any_rate"]
        flat[f"markers/{iv}/distinct_mean"] = r["distinct_mean"]
    return flat


def format_table(summary: dict[str, Any]) -> str:
    """The console table: per site x layer, median KL [p25, p75] and median geometry."""
    geo = {(r["site"], str(r["layer"]), r["metric"]): r["median"] for r in summary.get("geometry", [])}
    lines = []
    if summary.get("kl"):
        lines.append(f"{'site':<12} {'layers':<10} {'intervention':<14} {'KL median [p25, p75]':<28} "
                     f"{'cos(dXY,dX+dY)':>14} {'cos(dX,dY)':>10} {'|I|/|dXY|':>9}")
        for r in summary["kl"]:
            g = [geo.get((r["site"], r["layers"], m)) for m in ("cos_xy_sum", "cos_x_y", "inter_ratio")]
            gs = " ".join(f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}" for v, w in zip(g, (14, 10, 9), strict=True))
            kl = f"{r['median']:.4f} [{r['p25']:.4f}, {r['p75']:.4f}]"
            lines.append(f"{r['site']:<12} {r['layers'] or '-':<10} {r['intervention']:<14} {kl:<28} {gs}")
    if summary.get("markers"):
        lines.append(f"{'condition':<12} {'any-marker rate':>16} {'cells':>9} {'mean distinct':>14}")
        for iv, r in summary["markers"].items():
            lines.append(f"{iv:<12} {r['any_rate']:>16.3f} {r['any_cells']:>4}/{r['cells']:<4} {r['distinct_mean']:>14.2f}")
    return "\n".join(lines)


class JobStore:
    """The stable folder of one job key: parts, final files, and a lock against twin jobs."""

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key
        self.key = key
        self.parts = self.dir / "parts"

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").is_file() and (self.dir / "results.parquet").is_file()

    def claim(self, config: dict[str, Any]) -> None:
        """Bind the folder to this key's config; refuse a folder written for another config."""
        self.parts.mkdir(parents=True, exist_ok=True)
        own = self.dir / "config.json"
        if own.is_file():
            found = json.loads(own.read_text())
            if found.get("key") != self.key:
                raise RuntimeError(
                    f"results folder {self.dir} belongs to config key {found.get('key')!r}, not {self.key!r}; "
                    "refusing to overwrite it (choose another results_root or remove the folder)"
                )
        else:
            atomic_write_json(own, {"key": self.key, "config": config})

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive for the job's lifetime: a twin job waits, then finds the work done."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read_parts(self) -> tuple[pd.DataFrame, list[dict[str, Any]], set[str]]:
        """Rows, generation records and cell keys of every readable part; unreadable ones are dropped."""
        frames, gens, cells = [], [], set()
        for p in sorted(self.parts.glob("*.parquet")):
            meta = p.with_suffix(".json")
            try:
                info = json.loads(meta.read_text())
                df = pd.read_parquet(p)
                if set(df.columns) != set(COLUMNS) or info.get("rows") != len(df):
                    raise ValueError("columns or row count do not match its record")
            except Exception as e:  # a part we cannot trust is recomputed, never used
                log.warning("dropping unreadable result part %s (%s); its cells will be recomputed", p.name, e)
                p.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                continue
            frames.append(df)
            gens.extend(info.get("generations", []))
            cells.update(info["cells"])
        df = pd.concat(frames, ignore_index=True) if frames else frame([])
        return df, gens, cells

    def write_part(self, name: str, df: pd.DataFrame, cells: list[str], generations: list[dict] | None = None) -> None:
        """Parquet first, then its record: a part without a record is not trusted."""
        atomic_write_parquet(self.parts / f"{name}.parquet", df)
        atomic_write_json(self.parts / f"{name}.json", {"cells": cells, "rows": len(df), "generations": generations or []})

    def finish(self, df: pd.DataFrame, summary: dict[str, Any], generations: list[dict]) -> None:
        atomic_write_parquet(self.dir / "results.parquet", df)
        atomic_write_json(self.dir / "summary.json", summary)
        if generations:
            atomic_write_text(self.dir / "generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
        atomic_write_json(self.dir / "done.json", {"key": self.key, "rows": len(df)})

"""Finding job dirs, reading and validating their results (schema, unreadable files), atomic writes."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import yaml

import lac
from lac.io import atomic_write
from lac.report._common import (
    REPORT_KIND,
    REPORT_MARKER,
    RESULTS_FILE,
    SUMMARY_FILE,
    _norm_layers,
)
from lac.results import current_schema
from lac.schema import COLUMNS, READABLE_SCHEMAS, SCHEMA_VERSION


class SchemaError(ValueError):
    """Results written under a schema this report does not read."""


class UnreadableResultsWarning(UserWarning):
    """A results.parquet that could not be read was left out of the report."""


class NoReadableResults(RuntimeError):
    """Every results.parquet found was unreadable: nothing to build a report from."""

    def __init__(self, unreadable: Sequence[tuple[Path, str]]):
        self.unreadable = list(unreadable)
        listed = "; ".join(f"{f} ({why})" for f, why in self.unreadable)
        super().__init__(
            f"none of the {len(self.unreadable)} results file(s) found is readable: {listed}"
        )


# what reading a file that is not (or no longer) a whole parquet file raises: ArrowInvalid
# (a ValueError) for a missing footer or an empty file, OSError for corrupt pages or no access
UNREADABLE_ERRORS = (OSError, ValueError, pa.ArrowException)


# --------------------------------------------------------------------------- discovery


@dataclass
class Found:
    """What a search of the paths turned up (kept together so messages can list it)."""

    searched: list[Path]
    jobs: list[Path] = field(default_factory=list)
    incomplete: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)


def is_report_dir(d: Path) -> bool:
    """A previous report's output also holds results.parquet; it must not be read back."""
    marker = d / REPORT_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("kind") == REPORT_KIND
    except (OSError, ValueError, AttributeError):
        return False


def find_job_dirs(paths: Sequence[Path | str], exclude: Iterable[Path | str] = ()) -> Found:
    """Every job dir under `paths` (recursively), plus unfinished ones (parts/ only).

    A PATH may also be a results.parquet file. Report output dirs are skipped.
    """
    excluded = {Path(p).resolve() for p in exclude}
    found = Found(searched=[Path(p) for p in paths])
    jobs: dict[Path, None] = {}
    incomplete: dict[Path, None] = {}
    for p in found.searched:
        if p.is_file() and p.name == RESULTS_FILE:
            candidates = [p]
            roots: list[Path] = []
        elif p.is_dir():
            candidates = sorted(p.rglob(RESULTS_FILE))
            roots = [p, *sorted(d for d in p.rglob("*") if d.is_dir())]
        else:
            found.missing.append(p)
            continue
        for f in candidates:
            d = f.parent.resolve()
            if d in excluded or is_report_dir(d):
                continue
            jobs[d] = None
        for d in roots:
            rd = d.resolve()
            unfinished = (d / "parts").is_dir() or (d / ".hydra" / "overrides.yaml").is_file()  # a store, a Hydra job dir
            if unfinished and not (d / RESULTS_FILE).exists() and rd not in excluded and not is_report_dir(d):
                incomplete[rd] = None
    found.jobs = list(jobs)
    found.incomplete = list(incomplete)
    return found


def describe_incomplete(d: Path) -> str:
    """What an unfinished job dir is: a job store with parts, or a Hydra job dir without results
    (its job was killed or failed mid-way; a job refused by its checks leaves no folder)."""
    if (d / "parts").is_dir():
        return f"{d} (parts/ without results.parquet: interrupted; the same command resumes it)"
    try:
        overrides = " ".join(map(str, yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or []))
    except (OSError, ValueError, yaml.YAMLError):
        overrides = "?"
    return f"{d} (job {overrides or '(defaults)'}: no results: interrupted or failed; the same command resumes it)"


def read_summary(job_dir: Path) -> dict[str, Any] | None:
    """summary.json of a job, or None when absent or unreadable."""
    f = Path(job_dir) / SUMMARY_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def load_results(
    job_dirs: Sequence[Path],
    on_unreadable: Callable[[Path, str], None] | None = None,
) -> pd.DataFrame:
    """One tidy table from all jobs; refuses any job not written under SCHEMA_VERSION.

    Refusing (rather than coercing) is the point: a schema change means the rows
    mean something else, and a silently mixed report would be wrong.

    A results.parquet that cannot be read (truncated, empty, garbage) is skipped:
    `on_unreadable(path, reason)` is called for it (default: an
    UnreadableResultsWarning naming it). If every file is unreadable,
    NoReadableResults is raised.
    """
    frames = []
    unreadable: list[tuple[Path, str]] = []
    for d in job_dirs:
        f = Path(d) / RESULTS_FILE
        summary = read_summary(Path(d)) or {}
        written_by = (
            f" (written by lac {summary['lac_version']})" if "lac_version" in summary else ""
        )
        if "schema" in summary and summary["schema"] not in READABLE_SCHEMAS:
            raise SchemaError(
                f"{Path(d) / SUMMARY_FILE}: schema {summary['schema']!r}{written_by}; "
                f"this lac {lac.__version__} reads schemas {READABLE_SCHEMAS} only"
            )
        try:
            df = pd.read_parquet(f)
        except UNREADABLE_ERRORS as e:
            why = f"{type(e).__name__}: {e}"
            unreadable.append((f, why))
            if on_unreadable is None:
                warnings.warn(
                    f"skipped unreadable results file {f} ({why})",
                    UnreadableResultsWarning,
                    stacklevel=2,
                )
            else:
                on_unreadable(f, why)
            continue
        if "schema" not in df.columns:
            raise SchemaError(
                f"{f}: no 'schema' column{written_by}; "
                f"this lac {lac.__version__} reads schemas {READABLE_SCHEMAS} only"
            )
        col = df["schema"]
        if col.isna().any() or (~col.dropna().isin(READABLE_SCHEMAS)).any():
            shown = ", ".join(str(v) for v in sorted(set(col.dropna().tolist()))) or "missing"
            raise SchemaError(
                f"{f}: schema {shown}{written_by}; "
                f"this lac {lac.__version__} reads schemas {READABLE_SCHEMAS} only"
            )
        df = current_schema(df)  # an older schema: the columns it lacks get their defaults
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise SchemaError(f"{f}: schema {SCHEMA_VERSION} but columns missing: {missing}")
        frames.append((_finished(summary, f), grid_identity(summary), df[list(COLUMNS)]))
    if unreadable and not frames:
        raise NoReadableResults(unreadable)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})
    frames.sort(key=lambda t: t[0])  # oldest first: a row measured twice keeps its newest value
    renamed = _grids_apart(frames)
    out = pd.concat([df for *_, df in frames], ignore_index=True).astype(COLUMNS)
    out["layers"] = out["layers"].map(_norm_layers).astype("string")
    out.attrs["grids_renamed"] = renamed
    return out


def _finished(summary: dict[str, Any], results: Path) -> float:
    """When a job finished: summary.json's `finished`, else (jobs before lac recorded it) its results' mtime."""
    try:
        return float(summary.get("finished") or results.stat().st_mtime)
    except (OSError, TypeError, ValueError):
        return 0.0


def grid_identity(summary: dict[str, Any]) -> tuple[str, str] | None:
    """What a job's grid was, beyond its name: ("hash", its content hash) from summary.json's `grid_hash`, or
    rebuilt from a grid given inline in its config; for a grid file of a job from before lac recorded the
    hash, ("path", the file's path); None when unknown."""
    if summary.get("grid_hash"):
        return ("hash", str(summary["grid_hash"]))
    grid = (summary.get("config") or {}).get("grid")
    if not isinstance(grid, dict):
        return None
    if grid.get("path"):
        return ("path", str(grid["path"]))
    try:
        from lac.grid import grid_from_mapping

        return ("hash", grid_from_mapping(grid, name=str(grid.get("name"))).content_hash())
    except Exception:  # a config this lac cannot read as a grid: no identity, never renamed
        return None


def _grids_apart(frames: list[tuple[float, tuple[str, str] | None, pd.DataFrame]]) -> dict[str, list[str]]:
    """Jobs of different grids that share a name (two files called g.yaml, or one edited in place) would be
    pooled in every median under that name: each is renamed `<name>@<6 hex>` of its content, in place.
    Content hashes are compared with content hashes, paths (older jobs) with paths. Returns {name: the
    names given} for the report to say so."""
    seen: dict[tuple[str, str], set[str]] = {}
    for _, ident, df in frames:
        if ident is not None:
            for name in df["grid"].dropna().unique():
                seen.setdefault((str(name), ident[0]), set()).add(ident[1])
    clash = {name for (name, _), idents in seen.items() if len(idents) > 1}
    renamed: dict[str, list[str]] = {}
    for i, (t, ident, df) in enumerate(frames):
        hit = df["grid"].isin(clash)
        if ident is None or not hit.any():
            continue
        tag = hashlib.sha256(":".join(ident).encode()).hexdigest()[:6]
        df = df.assign(grid=df["grid"].where(~hit, df["grid"].astype(str) + f"@{tag}"))
        for name in sorted(set(df.loc[hit, "grid"])):
            base = name.rpartition("@")[0]
            if name not in renamed.setdefault(base, []):
                renamed[base].append(name)
        frames[i] = (t, ident, df)
    return renamed


def drop_duplicate_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """Keep the last copy of a row measured twice: (rows, copies dropped, of them with another value).

    Two copies of one cell would count it twice in every median. Equal copies are by design (paper
    table 4's jobs each repeat host_none and the layer-13 geometry); unequal ones mean two
    different runs of one cell, which the report should say.
    """
    key = [c for c in COLUMNS if c not in ("value", "schema")]
    dup = df.duplicated(subset=key, keep="last")
    differ = ~df.duplicated(subset=[*key, "value"], keep="last") & dup
    return df[~dup].reset_index(drop=True), int(dup.sum()), int(differ.sum())


# --------------------------------------------------------------------------- writing


def _atomic(path: Path, write: Any) -> Path:
    """lac's one atomic write (temp file, fsync, rename): readers never see half a file."""
    atomic_write(path, write)
    return path


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    return _atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_text(text: str, path: Path) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def _conf_depths() -> dict[str, int]:
    """n_layers of every model config lac ships (conf/model/*.yaml), by config name and by id."""
    import yaml

    from lac.paths import conf_dir

    out: dict[str, int] = {}
    for f in sorted((Path(conf_dir()) / "model").glob("*.yaml")):
        try:
            m = yaml.safe_load(f.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if m.get("n_layers"):
            for k in (m.get("name"), m.get("id")):
                if k:
                    out[str(k)] = int(m["n_layers"])
    return out


def model_depths(job_dirs: Sequence[Path] = (), df: pd.DataFrame | None = None) -> dict[tuple[str, str], int]:
    """Depth (n_layers) per (model, model_id): the jobs' summary.json config first, then lac's
    model configs by id or name. Models found in neither are left out (figures then use absolute layers)."""
    out: dict[tuple[str, str], int] = {}
    for d in job_dirs:
        config = (read_summary(Path(d)) or {}).get("config")
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict) and model.get("n_layers") and model.get("name"):
            out.setdefault((str(model["name"]), str(model.get("id"))), int(model["n_layers"]))
    if df is not None and not df.empty:
        known = _conf_depths()
        for m, i in {(str(m), str(i)) for m, i in zip(df["model"], df["model_id"], strict=True)}:
            n = out.get((m, i)) or known.get(i) or known.get(m)
            if n:
                out[(m, i)] = n
    return out

"""Activation cache: clean captures shared by every job of a sweep.

Two levels. In memory, whole CellCaptures (traces and KV included) live for the
process, so a basic-launcher multirun never recaptures a cell. On disk, under
`$LAC_CACHE_DIR/activations/<key>/<cell>.safetensors`, what decomposition and KL
read (ref, site residuals of every role, clean window log-probs) is shared between
processes (joblib, submitit, the next `python -m lac.run`), and with `traces` also
the traces patched rows continue (KV and block inputs of the host prompts + ref):
on a CPU, reading them takes milliseconds where rebuilding them (a prefix tree and
a teacher-forced pass) took seconds, and the patched rows continue the very trace
the first job computed. The key covers model identity, dtype, attention
implementation, chat template and grid text. Files are written atomically and
carry a SHA-256 of their tensors: a corrupt or truncated entry is reported,
deleted and recomputed, never trusted. No pickle.

Each key folder records what it holds (`about.json`: model, grid, dtype, versions; its mtime
is when a job last opened the folder), so `python -m lac.cache` can list the cache and
prune folders no job of this lac will read again (another numerics or capture version) or
that no job has used for days.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lac import sites
from lac.capture import CellCapture
from lac.engine import Trace
from lac.grid import Cell, Grid
from lac.io import atomic_write, atomic_write_json, remove_stale_tmp
from lac.models import LoadedModel
from lac.numerics import NUMERICS_VERSION
from lac.prompts import PromptBook, PromptError, user_message

log = logging.getLogger("lac.cache")
CAPTURE_VERSION = 1
_MEMORY: OrderedDict[tuple[str, str], CellCapture] = OrderedDict()


def cache_root() -> Path:
    """$LAC_ACTIVATIONS_DIR, else activations/ beside the embedded models ($LAC_CACHE_DIR)."""
    if os.environ.get("LAC_ACTIVATIONS_DIR"):
        return Path(os.environ["LAC_ACTIVATIONS_DIR"]).expanduser()
    from lac.embedded import cache_root as root

    return root() / "activations"


def capture_key(lm: LoadedModel, grid: Grid) -> str:
    cfg = lm.model.config
    ident = {
        "model_id": lm.model_id,
        "name_or_path": getattr(cfg, "_name_or_path", ""),
        "config": {k: v for k, v in sorted(cfg.to_dict().items()) if isinstance(v, (int, float, str, bool))},
        "dtype": str(lm.dtype),
        "linear": lm.linear,
        "attn": getattr(cfg, "_attn_implementation", None),
        "template": hashlib.sha256(str(getattr(lm.tokenizer, "chat_template", "")).encode()).hexdigest(),
        "grid": grid.content_hash(),
        "message": user_message("{persona}", "{task}"),  # the prompt template lac fills in
        "sites": [sites.SITES, sites._WINDOW_START, sites.REF_TOKENS, sites.WINDOW],
        "version": CAPTURE_VERSION,
        "numerics": NUMERICS_VERSION,
    }
    if lm.files and lm.files.startswith("folder:"):  # a local folder: its files, not its path
        ident["model_id"] = ident["name_or_path"] = lm.files
        ident["config"].pop("_name_or_path", None)  # the path again, as from_pretrained recorded it
    elif lm.files:  # a hub id at its commit
        ident["commit"] = lm.files
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ActivationCache:
    def __init__(self, lm: LoadedModel, grid: Grid, *, disk: bool = True, memory_cells: int = 256,
                 traces: bool = False, shared: bool = True):
        """`shared=False` (engine.activation_cache=false): this job's captures stay its own, in memory
        too, so none comes from an earlier job of the process (a notebook's, a multirun's)."""
        self.key = capture_key(lm, grid)
        self.memory: OrderedDict[tuple[str, str], CellCapture] = _MEMORY if shared else OrderedDict()
        self.dir = cache_root() / self.key if disk else None
        if self.dir is not None:
            remove_stale_tmp(self.dir)
            _note_use(self.dir, {"model": lm.name, "model_id": lm.model_id, "dtype": str(lm.dtype).replace("torch.", ""),
                                 "linear": lm.linear, "grid": grid.name, "capture_version": CAPTURE_VERSION,
                                 "numerics_version": NUMERICS_VERSION})
        self.traces, self.device = traces, lm.device
        self.memory_cells = memory_cells
        self.hits = {"memory": 0, "disk": 0, "miss": 0}

    def _path(self, cell: Cell) -> Path:
        return self.dir / f"{cell.key}.safetensors"

    def get(self, cells: list[Cell], book: PromptBook) -> dict[str, CellCapture]:
        found = {}
        for c in cells:
            cap = self.memory.get((self.key, c.key))
            if cap is not None:
                self.memory.move_to_end((self.key, c.key))
                self.hits["memory"] += 1
            elif self.dir is not None and self._path(c).is_file():
                cap = self._load(c, book)
                self.hits["disk" if cap else "miss"] += 1
            else:
                self.hits["miss"] += 1
            if cap is not None:
                found[c.key] = cap
        return found

    def stored(self, cap: CellCapture) -> tuple:
        """What of `cap` goes to disk: a cell whose value changed while a job used it is written again."""
        traces = tuple((r, t.first, t.depth) for r, t in sorted(cap.traces.items()) if self.traces and _storable(t))
        return (tuple(cap.ref), tuple((r, h.shape[1]) for r, h in sorted(cap.site_h.items())), tuple(sorted(cap.logp)),
                traces)

    def put(self, caps: list[CellCapture], changed: set[str]) -> None:
        for cap in caps:
            self.memory[(self.key, cap.cell.key)] = cap
            self.memory.move_to_end((self.key, cap.cell.key))
            if self.dir is not None and cap.cell.key in changed:
                try:
                    self._save(cap)
                except OSError as e:  # optional: a full disk or a read-only cache never stops a job
                    log.warning("activation cache: cannot write to %s (%s); this job continues without "
                                "the on-disk cache", self.dir, e.strerror or e)
                    self.dir = None
        while len(self.memory) > self.memory_cells:
            self.memory.popitem(last=False)

    def _save(self, cap: CellCapture) -> None:
        tensors = {"ref": torch.tensor(cap.ref, dtype=torch.int64)}
        meta = {}
        for role, h in cap.site_h.items():
            tensors[f"site_h.{role}"] = h.contiguous()
        for role, lp in cap.logp.items():
            first = min(lp)
            tensors[f"logp.{role}"] = torch.stack([lp[first + j] for j in range(len(lp))]).contiguous()
            meta[f"logp_first.{role}"] = str(first)
        if self.traces:
            for role, t in cap.traces.items():
                _put_trace(tensors, meta, role, t)
        meta["sha256"] = _digest(tensors)
        meta["cell"] = cap.cell.key
        atomic_write(self._path(cap.cell), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def _load(self, cell: Cell, book: PromptBook) -> CellCapture | None:
        path = self._path(cell)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            if meta.get("cell") != cell.key or meta.get("sha256") != _digest(tensors):
                raise ValueError("checksum or cell name does not match")
        except Exception as e:
            log.warning("activation cache entry %s is corrupt (%s): deleting it and recomputing", path, e)
            path.unlink(missing_ok=True)
            return None
        cap = CellCapture(cell, tensors["ref"].tolist(), {}, full=book.grid.full)
        for name, t in tensors.items():
            kind, _, role = name.partition(".")
            if kind == "site_h":
                cap.site_h[role] = t
            elif kind == "logp":
                first = int(meta[f"logp_first.{role}"])
                cap.logp[role] = {first + j: t[j] for j in range(t.shape[0])}
        for name in tensors:  # after the log-probs, which a host's trace carries too
            kind, _, role = name.partition(".")
            if kind == "trace_ids" and self.traces:
                cap.traces[role] = _get_trace(tensors, meta, role, cap.logp.get(role, {}), self.device)
        for role in [*cap.site_h, *cap.traces]:
            try:
                cap.prompts[role] = book.get(cell, role)
            except PromptError:  # a prompt lac no longer makes for this design (bare of a grid without a persona)
                for held in (cap.site_h, cap.traces, cap.logp):
                    held.pop(role, None)
        for role, t in cap.traces.items():  # today's tokenizer must give the prompt the trace continued
            n = len(cap.prompts[role].ids)
            if t.ids[:n] != list(cap.prompts[role].ids) or t.ids[n:] != cap.ref[: len(t.ids) - n]:
                log.warning("activation cache entry %s is stale (its %s trace is not this prompt + ref): "
                            "deleting it and recomputing", path, role)
                path.unlink(missing_ok=True)
                return None
        return cap


def _storable(t: Trace) -> bool:
    """KV of one shape at every layer (stacked on disk); other traces are rebuilt by a forward."""
    return len({k.shape for k, _ in t.kv} | {v.shape for _, v in t.kv}) == 1


def _put_trace(tensors: dict[str, torch.Tensor], meta: dict[str, str], role: str, t: Trace) -> None:
    """A trace as tensors: ids, K and V stacked over layers, block inputs from position `first`."""
    if not _storable(t):
        return
    tensors[f"trace_ids.{role}"] = torch.tensor(t.ids, dtype=torch.int64)
    tensors[f"trace_k.{role}"] = torch.stack([k for k, _ in t.kv]).cpu().contiguous()
    tensors[f"trace_v.{role}"] = torch.stack([v for _, v in t.kv]).cpu().contiguous()
    if t.hidden is not None:
        tensors[f"trace_h.{role}"] = t.hidden.cpu().contiguous()
    meta[f"trace_first.{role}"], meta[f"trace_depth.{role}"] = str(t.first), str(t.depth)


def _get_trace(tensors: dict[str, torch.Tensor], meta: dict[str, str], role: str,
               logp: dict[int, torch.Tensor], device: torch.device) -> Trace:
    k, v = tensors[f"trace_k.{role}"].to(device), tensors[f"trace_v.{role}"].to(device)
    hidden = tensors.get(f"trace_h.{role}")
    return Trace(
        ids=tensors[f"trace_ids.{role}"].tolist(), kv=list(zip(k.unbind(0), v.unbind(0), strict=True)),
        hidden=None if hidden is None else hidden.to(device), first=int(meta[f"trace_first.{role}"]),
        depth=int(meta[f"trace_depth.{role}"]), logp={p: x.to(device) for p, x in logp.items()},
    )


ABOUT = "about.json"


def _note_use(folder: Path, about: dict) -> None:
    """Record what a key folder holds (once) and when a job last opened it (the record's mtime).
    Optional like the whole disk cache: a folder that cannot be written is left as it is."""
    record = folder / ABOUT
    try:
        if record.is_file():
            os.utime(record)
        else:
            atomic_write_json(record, about)
    except OSError:
        pass


_KEY = re.compile(r"[0-9a-f]{20}")  # capture_key's folder names


def folders(root: Path | None = None) -> list[dict]:
    """Every key folder under the cache root: what it holds, its size, when last used, and whether
    this lac reads it (`status`: current, stale, or unknown for folders written before `about.json`)."""
    import time

    root = cache_root() if root is None else Path(root)
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            entries: list[Path] | None = list(d.iterdir())
        except OSError:  # a folder this process cannot list is nobody's to delete here
            entries = None
        files = [f for f in entries or [] if f.is_file()]
        if entries is None or not _KEY.fullmatch(d.name) or len(files) < len(entries):
            # not made by the cache (a capture key's name, holding only files): LAC_ACTIVATIONS_DIR set to
            # ~/.cache/lac, say, whose models/ hold the converted weights; listed as foreign, never deleted
            found.append({"key": d.name, "path": d, "status": "foreign", "about": {}, "cells": 0,
                          "bytes": sum(f.stat().st_size for f in d.rglob("*") if f.is_file()), "used": 0.0,
                          "days_unused": None})
            continue
        about, record = {}, d / ABOUT
        try:
            about = json.loads(record.read_text())
        except (OSError, ValueError):
            pass
        used = record.stat().st_mtime if record.is_file() else max((f.stat().st_mtime for f in files), default=0.0)
        days = (time.time() - used) / 86400 if used else None  # an empty folder: no use to date
        if not about:
            status = "unknown"
        elif (about.get("numerics_version"), about.get("capture_version")) == (NUMERICS_VERSION, CAPTURE_VERSION):
            status = "current"
        else:
            status = "stale"
        found.append({"key": d.name, "path": d, "status": status, "about": about,
                      "cells": sum(f.suffix == ".safetensors" for f in files),
                      "bytes": sum(f.stat().st_size for f in files), "used": used, "days_unused": days})
    return found


def main(argv: list[str] | None = None) -> int:
    """`python -m lac.cache`: list the on-disk activation cache; `--prune-stale` / `--prune-unused DAYS`
    delete folders (`--dry-run` only says which). Run it while no job uses the cache."""
    import argparse
    import shutil
    import time

    ap = argparse.ArgumentParser(prog="python -m lac.cache", description=main.__doc__)
    ap.add_argument("--prune-stale", action="store_true",
                    help=f"delete folders of another numerics or capture version (this lac: numerics "
                         f"{NUMERICS_VERSION}, capture {CAPTURE_VERSION}); no job of this lac reads them")
    ap.add_argument("--prune-unused", type=float, metavar="DAYS",
                    help="delete folders no job has opened for more than DAYS days")
    ap.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    args = ap.parse_args(argv)
    if args.prune_unused is not None and args.prune_unused < 0:
        ap.error(f"--prune-unused {args.prune_unused:g}: give a number of days >= 0")
    root = cache_root()
    rows = folders(root)
    print(f"activation cache {root}: {len(rows)} folder(s), {sum(r['bytes'] for r in rows) / 2**20:.0f} MiB")
    for r in rows:
        if r["status"] == "foreign":
            print(f"  {r['key']}  not an activation-cache folder ({r['bytes'] / 2**20:.1f} MiB): left alone")
            continue
        a = r["about"]
        what = f"{a.get('model', '?')} ({a.get('dtype', '?')}, {a.get('linear', '?')}) grid {a.get('grid', '?')}" if a \
            else "written before lac recorded what a folder holds"
        when = time.strftime("%Y-%m-%d", time.localtime(r["used"])) if r["used"] else "never"
        print(f"  {r['key']}  {r['status']:<7}  {r['cells']:>4} cells  {r['bytes'] / 2**20:>8.1f} MiB  "
              f"last used {when}  {what}")
    doomed = [r for r in rows if (args.prune_stale and r["status"] == "stale")
              or (args.prune_unused is not None and r["days_unused"] is not None
                  and r["days_unused"] > args.prune_unused)]
    for r in doomed:
        unused = f"unused for {r['days_unused']:.1f} days" if r["days_unused"] is not None else "never used"
        print(f"{'would delete' if args.dry_run else 'deleting'} {r['path']} ({r['status']}, {unused}, "
              f"{r['bytes'] / 2**20:.1f} MiB)")
        if not args.dry_run:
            shutil.rmtree(r["path"], ignore_errors=True)
    if doomed:
        print(f"{'would free' if args.dry_run else 'freed'} {sum(r['bytes'] for r in doomed) / 2**20:.1f} MiB")
    elif args.prune_stale or args.prune_unused is not None:
        print("nothing to delete: no folder is " + " or ".join(
            (["stale"] if args.prune_stale else [])
            + ([f"unused for over {args.prune_unused:g} days"] if args.prune_unused is not None else [])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

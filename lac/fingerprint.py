"""What a job's key must cover beyond its config's text: the contents of the files it names.

A config names a custom grid and a model folder by path; the same path can hold other text or
other weights tomorrow (an edited grid, `save_pretrained` into the same folder), and the same
content can sit at two paths. Job keys and activation-cache keys therefore use these content
digests, never the path; a hub id is keyed by the commit it resolves to, and loads at that commit.
A model folder is hashed file by file with SHA-256; each file's digest is remembered with its
(size, mtime, ctime, inode) under ``$LAC_CACHE_DIR/fingerprints/``, so only a file that changed is
read again (2.5 GB: 2-4 s once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from lac.io import atomic_write_json, sha256_file

log = logging.getLogger("lac.fingerprint")
_ASKED: dict[str, str | None] = {}  # the hub's answer for ids not in the local cache yet
_SEEN: dict[Path, tuple[list, str]] = {}  # this process's digests, also where the memo cannot be written


def local_folder(model_id: str) -> Path | None:
    """The folder a hub-source model id names, if it is one (else a hub id, or nothing)."""
    path = Path(str(model_id)).expanduser()
    return path.resolve() if path.is_dir() else None


def _memo_path(folder: Path) -> Path:
    from lac.embedded import cache_root

    return cache_root() / "fingerprints" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def folder_digest(folder: str | Path) -> str:
    """SHA-256 over the name and SHA-256 of every non-hidden file at the folder's top (weights, config,
    tokenizer: what from_pretrained reads; a trainer's checkpoint-N/ subfolders are not)."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    stats = [(p.relative_to(folder).as_posix(), _stat_key(p.stat())) for p in files]
    if folder in _SEEN and _SEEN[folder][0] == stats:
        return _SEEN[folder][1]
    memo_file = _memo_path(folder)
    try:
        memo: dict[str, Any] = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    new: dict[str, Any] = {}
    hashed: list[int] = []
    t0 = time.perf_counter()
    for p, (rel, stat) in zip(files, stats, strict=True):
        seen = memo.get(rel)
        if isinstance(seen, dict) and seen.get("stat") == stat and isinstance(seen.get("sha256"), str):
            new[rel] = seen
            continue
        if not hashed:
            log.info("hashing the files of %s for the job key (once per change of a file)", folder)
        new[rel] = {"stat": stat, "sha256": sha256_file(p)}
        hashed.append(stat[0])
    if hashed:
        log.info("hashed %d file(s), %.2f GB, in %.1f s", len(hashed), sum(hashed) / 1e9, time.perf_counter() - t0)
    if new != memo:
        try:
            atomic_write_json(memo_file, new)
        except OSError as e:  # a read-only cache: the files are hashed again next time
            log.debug("cannot remember the digests of %s in %s: %s", folder, memo_file, e)
    blob = json.dumps({rel: e["sha256"] for rel, e in new.items()}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
    _SEEN[folder] = (stats, digest)
    return digest


def hub_commit(model_id: str) -> str | None:
    """The commit a hub id means now: the local Hugging Face cache's `main`, else the hub's (one
    request; lac's preflight has refused an uncached id the hub cannot serve); None if neither says."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # not a hub id at all: preflight names it
        return None
    if isinstance(hit, str):
        return Path(hit).parent.name  # .../snapshots/<commit>/config.json
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    if model_id not in _ASKED:  # once a process: a job keys, checks and loads the model
        try:
            from huggingface_hub import HfApi

            _ASKED[model_id] = HfApi().model_info(model_id, timeout=10).sha
        except Exception as e:  # gated without a token, or the hub went away: keyed by the id alone
            log.info("cannot ask the hub which commit %s is (%s); its jobs are keyed by the id alone", model_id, e)
            _ASKED[model_id] = None
    return _ASKED[model_id]


def revision(files: str | None) -> str | None:
    """The commit to load a hub model at (None: a folder, an embedded model, or an unknown commit)."""
    return files[4:] if files and files.startswith("hub:") else None


def model_files(model_cfg: Any) -> str | None:
    """What a model config loads, beyond its id: `folder:<digest>` for a local folder, `hub:<commit>` for a
    hub id (the model then loads at that commit); None for embedded models (their id carries the
    GGUF's SHA-256, and their folder is verified at every load)."""
    if model_cfg.get("source") != "hub":
        return None
    folder = local_folder(str(model_cfg.get("id")))
    if folder is not None:
        return f"folder:{folder_digest(folder)}"
    commit = hub_commit(str(model_cfg.get("id")))
    return f"hub:{commit}" if commit else None


def grid_file(path: str | Path) -> str:
    """`sha256:<digest>` of a grid file's parsed content (comments and layout do not count)."""
    from lac.grid import load_yaml

    blob = json.dumps(load_yaml(path), sort_keys=True, default=str)
    return f"sha256:{hashlib.sha256(blob.encode()).hexdigest()[:20]}"

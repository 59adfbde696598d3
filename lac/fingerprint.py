"""What a job's key must cover beyond its config's text: the contents of the files it names.

A config names a custom grid and a model folder by path; the same path can hold other text or
other weights tomorrow (an edited grid, `save_pretrained` into the same folder), and the same
content can sit at two paths. Job keys and activation-cache keys therefore use these content
digests, never the path. A model folder is hashed file by file with SHA-256; each file's digest
is remembered with its (size, mtime, ctime, inode) under ``$LAC_CACHE_DIR/fingerprints/``, so only
a file that changed is read again (2.5 GB: 2-4 s once).
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
    """SHA-256 over every non-hidden file's relative name and SHA-256 (weights, config, tokenizer)."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    stats = [(p.relative_to(folder).as_posix(), _stat_key(p.stat())) for p in files]
    if folder in _SEEN and _SEEN[folder][0] == stats:
        return _SEEN[folder][1]
    memo_file = _memo_path(folder)
    try:
        memo: dict[str, Any] = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    new: dict[str, Any] = {}
    hashed, t0 = 0, time.perf_counter()
    for p, (rel, stat) in zip(files, stats, strict=True):
        seen = memo.get(rel)
        if isinstance(seen, dict) and seen.get("stat") == stat and isinstance(seen.get("sha256"), str):
            new[rel] = seen
            continue
        if not hashed:
            log.info("hashing the files of %s for the job key (once per change of a file)", folder)
        new[rel] = {"stat": stat, "sha256": sha256_file(p)}
        hashed += stat[0]
    if hashed:
        log.info("hashed %.2f GB in %.1f s", hashed / 1e9, time.perf_counter() - t0)
    if new != memo:
        try:
            atomic_write_json(memo_file, new)
        except OSError as e:  # a read-only cache: the files are hashed again next time
            log.debug("cannot remember the digests of %s in %s: %s", folder, memo_file, e)
    blob = json.dumps({rel: e["sha256"] for rel, e in new.items()}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
    _SEEN[folder] = (stats, digest)
    return digest


def model_files(model_cfg: Any) -> str | None:
    """`folder:<digest>` for a model loaded from a local folder; None for hub ids and embedded models
    (an embedded model's id carries its GGUF's SHA-256, and its folder is verified at every load)."""
    if model_cfg.get("source") != "hub":
        return None
    folder = local_folder(str(model_cfg.get("id")))
    return f"folder:{folder_digest(folder)}" if folder is not None else None


def grid_file(path: str | Path) -> str:
    """`sha256:<digest>` of a grid file's parsed content (comments and layout do not count)."""
    from lac.grid import load_yaml

    blob = json.dumps(load_yaml(path), sort_keys=True, default=str)
    return f"sha256:{hashlib.sha256(blob.encode()).hexdigest()[:20]}"

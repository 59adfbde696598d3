"""Files that are whole or absent: one atomic-write helper, checksums, and a lock that says who holds it.

Every file lac writes that a later run trusts (result parts, final results,
summaries, activation-cache entries, converted models) goes through
`atomic_write`: written to a temp name beside the target, fsynced, renamed.
A crash leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lac.errors import LacError

log = logging.getLogger("lac.io")
_CHUNK = 8 << 20


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temp path beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: colleagues on shared storage could not read it
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (Linux: read, not set; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def unwritable(folder: str | Path) -> str | None:
    """Why `folder` cannot be written, or made, by this process (None if it can), without making it: a
    probe folder is made and removed in it or its nearest existing parent (root passes os.access; /proc,
    read-only mounts and immutable folders refuse the probe)."""
    path = Path(folder).expanduser().absolute()
    base = next(p for p in (path, *path.parents) if p.exists())
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(dir=base, prefix=".write-check-"))
    except OSError as e:
        return e.strerror or str(e)
    return None


TMP_MAX_AGE_S = 3600.0  # a temp file older than this is a killed writer's: a live one renames within seconds


def remove_stale_tmp(folder: str | Path, older_than_s: float = TMP_MAX_AGE_S) -> int:
    """Delete the temp files `atomic_write` left in `folder` when its process was killed mid-write
    (SIGKILL, preemption, power loss): never trusted, but a cache entry's is ~10 MB that nothing
    else would remove. Only files older than `older_than_s` go, so a writer still at work keeps its own."""
    cutoff, n = time.time() - older_than_s, 0
    try:
        found = list(Path(folder).glob(".*.tmp"))
    except OSError:
        return 0
    for tmp in found:
        try:
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                n += 1
        except OSError:  # gone already (another process swept it) or not ours to delete
            continue
    if n:
        log.info("removed %d temp file(s) left by an interrupted write in %s", n, folder)
    return n


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: str | Path, timeout: float = -1, what: str = "") -> Iterator[None]:
    """Exclusive inter-process lock (filelock). If another process holds it, log once
    "waiting for <path>, held by pid N" and wait (at most `timeout` s; -1: no limit)."""
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pid_file = path.with_name(path.name + ".pid")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = pid_file.read_text().strip() or "?"
        except OSError:
            holder = "?"
        log.info("waiting for %s%s, held by pid %s", path, f" ({what})" if what else "", holder)
        t0 = time.monotonic()
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise LacError(  # one line: another job is at work (an flock: a dead holder would have released it)
                f"gave up after {timeout:.0f} s waiting for {path}{f' ({what})' if what else ''}, held by pid "
                f"{holder}; the same command, once it is done, reuses or resumes its work"
            ) from None
        log.info("got %s after %.1f s", path, time.monotonic() - t0)
    try:
        with contextlib.suppress(OSError):
            pid_file.write_text(str(os.getpid()))
        yield
    finally:
        with contextlib.suppress(OSError):
            pid_file.unlink()
        lock.release()

"""Leaving a finished `python -m lac.run` at once, and leaving nothing behind.

Python's interpreter teardown (~2 s of freeing torch/transformers modules) is skipped with
os._exit, and with it what teardown would have stopped: loky's joblib workers (each with a model
loaded), the job's W&B child and wandb-core. Those are stopped and waited for here. A process left
to exit by itself goes to PID 1, and a container's PID 1 that never reaps (`sleep infinity`,
`docker run` without `--init`) keeps it as a zombie: two a job before this module.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def exit_now(code: object) -> None:
    """Every result, W&B run and log is written and flushed by then. Only for a finished
    `python -m lac.run`."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for sig in (signal.SIGINT, signal.SIGTERM):  # everything is written: a late signal cannot cut this short
        signal.signal(sig, signal.SIG_IGN)
    stop_tracker_children()
    stop_joblib_workers()
    reap_exited()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def stop_tracker_children() -> None:
    """This process's kept W&B child (it stops its wandb-core), and wandb-core itself where wandb
    ran in this process (tracker.process=false): each run is finished, so this takes ~10 ms."""
    remote = sys.modules.get("lac.tracker_process")
    if remote is not None:
        remote.shutdown()
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        with contextlib.suppress(Exception):  # the exit goes on whatever wandb's state
            wandb.teardown()


def stop_joblib_workers() -> None:
    """hydra/launcher=joblib: loky keeps its workers, each with a model loaded (~1.1 GB for the
    embedded one) and the command's output pipe open, for 300 s after their last job. Its shutdown
    kills each worker with its descendants (a job's W&B child, its wandb-core); this process becomes
    their subreaper first, so it can reap them once they are killed. (Letting the workers exit
    instead costs ~2.5 s of their interpreter teardown.) Then the exit handlers a normal exit would
    run (~10 ms): loky's queue semaphores and joblib's memmapping folder in /dev/shm are removed
    here, not by the resource trackers, which would report each as "leaked" on the console. Last,
    the queues' feeder threads are let finish: one removes its queue's write lock on its way out,
    and os._exit in between would leave the tracker that semaphore to report."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)
    if executor is None:
        return
    workers = list(getattr(executor, "_processes", None) or {})  # their pids
    orphans = descendants(workers) if become_subreaper() else set()
    executor.shutdown(wait=True, kill_workers=True)
    reap(orphans)
    atexit._run_exitfuncs()
    join_queue_feeders()
    stop_resource_trackers()


def stop_resource_trackers() -> None:
    """multiprocessing's and loky's resource trackers, which a joblib sweep starts: each exits once
    this process's end of its pipe closes, after os._exit, as an orphan of PID 1 (a zombie under one
    that never reaps). Closed and waited for here, with nothing left registered (see above)."""
    for name in ("multiprocessing.resource_tracker", "joblib.externals.loky.backend.resource_tracker"):
        tracker = getattr(sys.modules.get(name), "_resource_tracker", None)
        if tracker is not None and getattr(tracker, "_pid", None) is not None:
            with contextlib.suppress(Exception):  # private API (Python 3.8+): the exit goes on without it
                tracker._stop()


def join_queue_feeders(timeout: float = 2.0) -> None:
    """A multiprocessing queue's feeder thread (loky's too) outlives a closed queue made by this
    process: no exit handler joins it. Once it has the closing sentinel it frees the queue's write
    lock, a named semaphore: sem_unlink, then its unregister message to the resource tracker. A
    loaded machine can hold it between the two until after os._exit (seen 1 exit in 15 under load)."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def reap_exited() -> None:
    """Reap every child that has already exited, without waiting for a live one. As a joblib sweep's
    subreaper (lac.multirun), these include the W&B processes of workers that joblib killed on Ctrl-C;
    left here, they would pass to PID 1 as zombies. Only on the way out: a Popen waiting for one of
    them would find it gone."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def become_subreaper() -> bool:
    """Linux: orphans among this process's descendants come to it, not to PID 1."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(pids: list[int]) -> set[int]:
    """Every process below `pids` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def reap(pids: set[int], timeout: float = 5.0) -> None:
    """Wait for these (killed) children; one not ours, or not yet gone after `timeout`, is left."""
    left, deadline = set(pids), time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                done = True  # not this process's child (the subreaper flag did not take), or reaped
            if done:
                left.discard(pid)
        if left:
            time.sleep(0.01)

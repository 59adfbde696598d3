"""A job's W&B run in a child process (``tracker.process``, default true on POSIX).

Once a job computes, torch keeps every core of a CPU box busy; wandb's import and ``init``
(~1.1 s of Python, plus its wandb-core service starting) in a thread beside the compute
cost a default job ~1.5 s of its ~16 s on 2 cores (tracker=wandb against tracker=none).
This child is spawned as the job starts, imports wandb while the job's own start
(tokenizer, model imports: one thread) leaves a core idle, and calls ``wandb.init`` once
the job's checks have passed, while the weights load (a job refused by its checks gets
no run). It runs lac.tracking's own ``start_tracker`` and ``WandbTracker``;
:class:`RemoteTracker` is their stand-in in the job's process: it sends the results once
they are safe on disk and waits until the run is written. A job's process that dies
leaves no open run: the child sees the connection close and finishes the run with exit
code 1. The child's log lines come back to the job's log.

A multirun's jobs in one process (Hydra's basic launcher) share one child: once a job's run
is written the child waits for the next job's (`_spare`), so a later job pays neither the
import nor wandb-core's start beside its compute (~0.9 s a job on 2 cores). Each begin
carries the job's environment and working directory, which the child takes over, so a
job sees the same W&B variables and relative paths as in a child of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from lac import tracking
from lac.tracking import Tracker, TrackerError

COMMANDS = ("log_results", "log_generations")  # what the job's process may ask of the run
_GRACE = 60.0  # seconds past wandb's own timeout before a silent child counts as hung


class RemoteTracker(Tracker):
    """The job's side of a W&B run kept by a child process. `result()` is Future-like (the runner
    treats a run started in a thread and one started here alike)."""

    def __init__(self) -> None:
        spare = _take_spare()
        if spare is not None and spare.proc.poll() is None and spare.verbose == tracking._VERBOSE:
            self._conn, self._proc = spare.conn, spare.proc  # an earlier job's child, idle: this job's run goes there
        else:
            if spare is not None:
                _let_go(spare.conn, spare.proc)
            self._conn, self._proc = _spawn()
        self._begun = self._started = self._finished = self._released = False
        self._finish_timeout = float(tracking.DEFAULT_FINISH_TIMEOUT)
        self._init_timeout = float(tracking.DEFAULT_INIT_TIMEOUT)

    def begin(self, tcfg: Any, *, run_id: str, config: dict[str, Any], run_dir: Path, name: str) -> None:
        """Ask the child for the run (`wandb.init` there); returns at once."""
        self._finish_timeout = float(tracking._get(tcfg, "finish_timeout", tracking.DEFAULT_FINISH_TIMEOUT))
        self._init_timeout = float(tracking._get(tcfg, "init_timeout", tracking.DEFAULT_INIT_TIMEOUT))
        self._conn.send(("begin", {
            "tcfg": tracking._plain(tcfg), "run_id": run_id, "config": config, "run_dir": Path(run_dir),
            "name": name, "online_failed": tracking._online_failed,
            "environ": dict(os.environ), "cwd": os.getcwd(),
        }))
        self._begun = True

    def result(self) -> RemoteTracker:
        """This tracker once its run has started (raises what starting it raised)."""
        if not self._started:
            try:
                # an online init that fails is retried offline: two init timeouts at most
                _, self.mode, self.url_or_dir, online_failed, cpu = self._reply(
                    "started", 2 * self._init_timeout, "tracker.init_timeout")
            except BaseException:
                self._finished = True  # no run to finish: the child has given up (or is told to)
                self.close()
                raise
            tracking._online_failed = tracking._online_failed or online_failed  # later jobs go offline at once
            tracking.note_beside("W&B start (own process)", cpu)
            self._started = True
        return self

    @property
    def sync_command(self) -> str | None:
        return f"wandb sync {self.url_or_dir}" if self.mode == "offline" else None

    def log_results(self, df: Any, summary: dict[str, Any]) -> None:
        self._call("log_results", df, summary)

    def log_generations(self, records: list[dict[str, Any]]) -> None:
        self._call("log_generations", records)

    def finish(self, exit_code: int | None = None) -> None:
        """Finish the run (idempotent) and wait until the child has written it; the child then
        waits for this process's next job (`release`)."""
        if self._finished:
            return
        self._finished = True
        if self._begun:
            try:
                self._send(("finish", exit_code))
                self._reply("finished", self._finish_timeout, "tracker.finish_timeout")
            except BaseException:
                self.close()
                raise
        self.release()

    def release(self) -> None:
        """Done with the child: idle (its run written, or never begun) it is kept for this
        process's next job, in place of any other kept before; else it is let go (`close`)."""
        global _spare
        if self._released:
            return  # the child may serve another job by now
        self._released = True
        if self._begun and not self._finished or self._proc.poll() is not None:
            self.close()
            return
        old = _take_spare()
        if old is not None:
            _let_go(old.conn, old.proc)
        _spare = _Kept(self._conn, self._proc, tracking._VERBOSE, os.getpid())

    def close(self) -> None:
        """Let the child go: one never begun exits without a run, one begun finishes its run as failed."""
        self._released = True
        _let_go(self._conn, self._proc, self._finish_timeout)

    def _call(self, command: str, *args: Any) -> None:
        self.result()
        self._send((command, *args))
        self._reply("ok", self._finish_timeout, "tracker.finish_timeout")

    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except OSError:  # BrokenPipeError: the child is gone (killed, out of memory)
            self._gone()

    def _gone(self) -> NoReturn:
        """The child is gone: nothing left to finish (its run lacks its exit record, and the job's
        store does not mark it logged, so the next run of the job logs it)."""
        code = self._proc.wait()
        self._finished = True
        self.close()
        raise TrackerError(f"the W&B process ended before it answered (exit code {code})") from None

    def _reply(self, expected: str, timeout: float, setting: str) -> tuple:
        """The child's next answer; its log records are logged here on the way. A child silent for
        `timeout` (wandb's own limit for the step) plus `_GRACE` is hung: it is killed, never waited on
        for ever (the job's results are safe by then; its run is not marked, so the next run logs it)."""
        deadline = time.monotonic() + timeout + _GRACE
        while True:
            try:
                if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                    self._proc.kill()
                    self._proc.wait()
                    self._finished = True
                    self.close()
                    raise TrackerError(f"the W&B process did not answer within {timeout + _GRACE:.0f} s "
                                       f"({setting}={timeout:g} plus {_GRACE:g} s) and was stopped")
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._gone()
            if msg[0] == "log":
                _, name, level, text = msg
                logging.getLogger(name).log(level, "%s", text)
            elif msg[0] == "error":
                raise TrackerError(f"W&B: {msg[1]}")
            elif msg[0] == expected:
                return msg
            else:
                raise TrackerError(f"the W&B process answered {msg[0]!r} where {expected!r} was due")


class _Kept(NamedTuple):
    """An idle child kept for this process's next job."""

    conn: Connection
    proc: subprocess.Popen
    verbose: bool  # the child's verbosity, from its command line
    pid: int  # the process that kept it


_spare: _Kept | None = None


def _take_spare() -> _Kept | None:
    """The kept child, taken out of `_spare`, if this process kept it: a process forked from the one
    that did sees a copy of `_spare`, but the child (and its connection) are its parent's."""
    global _spare
    spare, _spare = _spare, None
    return spare if spare is not None and spare.pid == os.getpid() else None


def _spawn() -> tuple[Connection, subprocess.Popen]:
    ours, theirs = socket.socketpair()
    root = str(Path(tracking.__file__).resolve().parent.parent)  # lac importable in the child
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lac.tracker_process", str(theirs.fileno()), str(int(tracking._VERBOSE))],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
        )
    finally:
        theirs.close()
    return Connection(ours.detach()), proc


def _let_go(conn: Connection, proc: subprocess.Popen,
            finish_timeout: float = float(tracking.DEFAULT_FINISH_TIMEOUT)) -> None:
    """Close the connection and wait for the child (a begun run is finished as failed first); a minute
    past wandb's own `finish_timeout` it is killed."""
    with contextlib.suppress(OSError):
        conn.close()
    try:
        proc.wait(timeout=finish_timeout + _GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()


def shutdown() -> None:
    """Let the kept child go (it exits; it holds no open run) and wait for it: at Python's exit
    (atexit) and `python -m lac.run`'s (lac.leave) too, since a child left to exit by itself goes to
    PID 1, and a container's PID 1 that never reaps keeps it as a zombie."""
    spare = _take_spare()
    if spare is not None:
        _let_go(spare.conn, spare.proc)


atexit.register(shutdown)


class _ToParent(logging.Handler):
    """Log records of the child, sent to the job's process (which logs them as its own)."""

    def __init__(self, send):
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.send(("log", record.name, record.levelno, record.getMessage()))


def main(fd: int, verbose: bool = False) -> int:
    """The child: import wandb; then, job after job, wait for a run, serve its commands, finish it."""
    # Ctrl-C, and SIGTERM from `timeout` or `docker stop`, reach the whole process group: the job's
    # process ends the run (failed), not a traceback or a lost run here; if that process is killed
    # outright, the closed pipe ends the run
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    lock = threading.Lock()  # wandb's threads may log while the main thread answers

    def send(msg: tuple) -> None:
        with lock:
            conn.send(msg)

    root = logging.getLogger()
    root.handlers[:] = [_ToParent(send)]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)  # as log records, to the job's log
    tracking._VERBOSE = verbose
    logging.getLogger("lac").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        tracking.quiet_warnings()
    # now, on a core the job's start leaves idle (the point of this process): wandb, and what logging
    # the results needs (pandas unpickles the results' DataFrame)
    import pandas  # noqa: F401
    import wandb  # noqa: F401

    import lac.results  # noqa: F401

    cpu = 0.0  # CPU time of the previous runs (a multirun's later job reports its own only)
    while True:
        try:
            _, req = conn.recv()  # ("begin", start_tracker's arguments and the job's environment)
        except (EOFError, OSError):
            return 0  # the job ended, or failed its checks, before a run began; or the process is done
        service = os.environ.get("WANDB_SERVICE")  # wandb's address of this process's wandb-core
        os.environ.clear()
        os.environ.update(req.pop("environ"))
        if service:
            os.environ["WANDB_SERVICE"] = service
        os.chdir(req.pop("cwd"))
        tracking._online_failed = req.pop("online_failed")
        try:
            tracker = tracking.start_tracker(req.pop("tcfg"), **req)
        except Exception as e:
            send(("error", f"{type(e).__name__}: {e}"))
            return 1
        send(("started", tracker.mode, tracker.url_or_dir, tracking._online_failed, time.process_time() - cpu))
        if not _serve(conn, send, tracker):
            return 0  # the job's process went away: its run is finished (failed), nobody is left to ask
        cpu = time.process_time()


def _serve(conn: Connection, send, tracker: Tracker) -> bool:
    """One run's commands until "finish"; the run is finished either way. False: the job's
    process went away (the run ends with exit code 1)."""
    exit_code: int | None = 1  # the job's process went away without saying how the job ended
    here = False
    try:
        while True:
            try:
                command, *args = conn.recv()
            except (EOFError, OSError):
                break
            if command == "finish":
                exit_code, here = args[0], True
                break
            try:
                if command not in COMMANDS:
                    raise ValueError(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
                getattr(tracker, command)(*args)
            except Exception as e:
                send(("error", f"{type(e).__name__}: {e}"))
            else:
                send(("ok",))
    finally:
        tracker.finish(exit_code=exit_code)
    if here:
        try:
            send(("finished",))
        except OSError:
            return False
    return here


if __name__ == "__main__":
    code = main(int(sys.argv[1]), sys.argv[2:3] == ["1"])
    # every run is finished and written: stop wandb-core and wait for it (~5 ms; left to exit by itself,
    # it would stay a zombie under a PID 1 that does not reap), then skip Python's teardown at exit
    with contextlib.suppress(Exception):
        sys.modules["wandb"].teardown()
    logging.shutdown()
    os._exit(code)

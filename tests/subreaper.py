"""Run a command under a parent that never reaps orphans, like a container's PID 1 without an init
(`sleep infinity`, `docker run` without `--init`): every process the command leaves behind comes
here and stays, a zombie once it exits. Independent of lac.leave (its own /proc reading).

    python tests/subreaper.py CMD [ARGS...]

prints, as its last line, `subreaper: [...]` (JSON): each process left behind, with its state and
the command line it had while it ran; `leftovers(output)` reads that line back.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "subreaper: "


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, or None where it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0]


def _below(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = st[0]
    found, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def main(argv: list[str]) -> int:
    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise SystemExit("subreaper: prctl(PR_SET_CHILD_SUBREAPER) failed")
    me = os.getpid()
    seen: dict[int, str] = {}

    def look() -> None:
        for pid in _below(me):
            cmd = _cmdline(pid)
            if cmd:
                seen[pid] = cmd  # the latest: a process may exec

    proc = subprocess.Popen(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):  # a Ctrl-C or `timeout` to the command's group is not for PID 1
        signal.signal(sig, signal.SIG_IGN)
    while proc.poll() is None:
        look()
        time.sleep(0.1)
    # what the command's tree left comes here; wait (30 s at most) until each has exited or stays
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        look()
        left = {pid: st for pid in _below(me) if (st := _stat(pid)) is not None and st[0] == me}
        if all(state == "Z" for _, state in left.values()):
            break
        time.sleep(0.05)
    report = [{"pid": pid, "state": st[1], "cmd": seen.get(pid, "")} for pid, st in sorted(left.items())]
    print(PREFIX + json.dumps(report), flush=True)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # as a shell reports a signal


def command(*argv: str) -> list[str]:
    """`argv` run under this subreaper."""
    return [sys.executable, str(Path(__file__).resolve()), *argv]


def leftovers(output: str) -> list[dict]:
    """The processes the command left behind, from the wrapper's last line in `output`."""
    lines = [line for line in output.splitlines() if line.startswith(PREFIX)]
    assert lines, f"no {PREFIX!r} line in the output: {output[-2000:]}"
    return json.loads(lines[-1][len(PREFIX):])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

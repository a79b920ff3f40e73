"""Daemons the lab starts, and ending exactly those (by pid, checked against their command line)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ferry.qemu.launch import pid_alive


def spawn(argv: list[str], log_file: Path) -> int:
    """Start a detached daemon (own session, so it outlives the CLI); return its pid."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    return proc.pid


def ferry_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ferry.cli.main", *args]


def cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def ancestors() -> set[int]:
    """This process and its parents: never ours to end, whatever their arguments say."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (a lab's state folder): the lab's leftovers."""
    found, skip = [], ancestors()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in skip:
            if any(marker in arg for arg in cmdline(int(entry))):
                found.append(int(entry))
    return sorted(found)


# A zombie counts as gone; the same check QEMU's launcher uses.
alive = pid_alive


def terminate(pids: list[int], marker: str, grace_s: float = 5.0) -> None:
    """SIGTERM then SIGKILL, only to pids whose command line still mentions `marker`."""
    ours = [p for p in pids if any(marker in a for a in cmdline(p))]
    for pid in ours:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in ours):
        time.sleep(0.05)
    for pid in ours:
        if alive(pid) and any(marker in a for a in cmdline(pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in ours):
        time.sleep(0.05)

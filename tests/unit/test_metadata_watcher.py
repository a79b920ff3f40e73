"""guest/maintenance-watcher, run on the host with the busybox the guest image uses,
against the metadata HTTP layer on 127.0.0.1 (the guest side is tested under QEMU in
tests/e2e/test_metadata.py)."""
from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from ferry.agent.metadata import Snapshot, VmState, serve_connection
from ferry.qemu.image import BUSYBOX, GUEST_SRC

WATCHER = GUEST_SRC / "maintenance-watcher"
LINE = re.compile(r"^FERRY-MAINTENANCE-EVENT value=(\S+) etag=([0-9a-f]{16}) at=(\d+\.\d{6}) "
                  r"up=(\d+\.\d+) sent=(\d+\.\d+)$")

pytestmark = pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox-static not installed")


@pytest.fixture
def busybox_path(tmp_path) -> str:
    """A PATH of busybox applets only, as in the guest."""
    import subprocess
    d = tmp_path / "bin"
    d.mkdir()
    for applet in subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True).stdout.split():
        (d / applet).symlink_to(BUSYBOX)
    return str(d)


async def _next_line(proc: asyncio.subprocess.Process, prefix: str, timeout: float) -> tuple[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), max(0.01, deadline - time.monotonic()))
        if not line:
            raise AssertionError("watcher exited")
        text = line.decode().strip()
        if text.startswith(prefix):
            return text, time.time()


async def test_watcher_reports_each_change(tmp_path: Path, busybox_path: str):
    state = VmState(Snapshot(name="vm1", vm_id="1", hostname="vm1"))
    conns = []

    async def handler(r, w):
        conns.append(time.monotonic())
        await serve_connection(state, r, w)

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    run = tmp_path / "run"
    proc = await asyncio.create_subprocess_exec(
        str(BUSYBOX), "sh", str(WATCHER), stdout=asyncio.subprocess.PIPE,
        env={"PATH": busybox_path, "FERRY_METADATA": f"http://127.0.0.1:{port}", "FERRY_RUN": str(run)})
    try:
        first, _ = await _next_line(proc, "FERRY-MAINTENANCE-EVENT", 5)
        m = LINE.match(first)
        assert m and m[1] == "NONE", first
        assert abs(float(m[3]) - time.time()) < 5 and abs(float(m[5]) - time.time()) < 5
        assert (run / "maintenance-event").read_text() == "NONE\n"
        await asyncio.sleep(0.5)             # the watcher is waiting now

        for value in ("MIGRATE_ON_HOST_MAINTENANCE", "NONE", "TERMINATE_ON_HOST_MAINTENANCE"):
            t0 = time.time()
            state.update(maintenance_event=value)
            line, seen = await _next_line(proc, "FERRY-MAINTENANCE-EVENT", 5)
            print(f"{line}  (seen after {(seen - t0) * 1000:.0f} ms)")
            m = LINE.match(line)
            assert m and m[1] == value, line
            assert seen - t0 < 1.0
            assert t0 <= float(m[5]) < seen        # sent: host clock, after the change
            assert (run / "maintenance-event").read_text() == value + "\n"
            await asyncio.sleep(0.3)

        # Unchanged values (timeouts) are not reported again; with maintenance pending the
        # watcher polls with timeout_sec=2.
        n = len(conns)
        with pytest.raises(asyncio.TimeoutError):
            await _next_line(proc, "FERRY-MAINTENANCE-EVENT", 2.5)
        assert len(conns) > n

        # The server goes away: one error line, then one ok line once it is back.
        server.close()
        await server.wait_closed()
        for w in list(asyncio.all_tasks()):
            if w is not asyncio.current_task() and "serve_connection" in repr(w.get_coro()):
                w.cancel()
        err, _ = await _next_line(proc, "FERRY-MAINTENANCE-WATCH", 8)
        print(err)
        assert err.startswith("FERRY-MAINTENANCE-WATCH error=")
        server = await asyncio.start_server(handler, "127.0.0.1", port)
        ok, _ = await _next_line(proc, "FERRY-MAINTENANCE-WATCH", 5)
        assert ok.startswith("FERRY-MAINTENANCE-WATCH ok")
    finally:
        proc.kill()                          # our own watcher, by its process object
        await proc.wait()
        server.close()
        await server.wait_closed()

"""`make demo`: a lab fleet on this machine, VMs booted, one live-migrated, its timeline shown.

Set FERRY_DEMO_KEEP=1 to leave the lab running afterwards (then `ferry lab down`).
"""
from __future__ import annotations

import os
import sys
import time

from rich.console import Console

from ferry.cli import render
from ferry.cli.client import ControllerClient
from ferry.lab.config import LabConfig
from ferry.lab.lab import down, up

console = Console(width=120)


def say(msg: str) -> None:
    console.print(msg, highlight=False)


def wait_guest(api: ControllerClient, name: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        detail = api.get(f"/v1/vms/{name}")
        if "error" not in (detail.get("guest") or {"error": 1}):
            return detail
        time.sleep(0.5)
    raise RuntimeError(f"guest {name} did not come up within {timeout_s:.0f} s")


def follow(api: ControllerClient, m: dict) -> dict:
    while m["phase"] not in ("completed", "aborted", "failed"):
        time.sleep(0.25)
        m = api.get(f"/v1/migrations/{m['id']}")
    return m


def main() -> int:
    cfg = LabConfig(hosts=3, host_memory_mib=4096)
    say("[bold]ferry demo[/bold]: a 3-host lab fleet, live migration of a busy VM")
    up(cfg, log=say)
    api = ControllerClient(cfg.controller)
    try:
        console.print(render.hosts_table(api.get("/v1/hosts")))
        for name, workload in (("web-1", "memload:rate=100"), ("web-2", "memload:rate=20"), ("db-1", "idle")):
            vm = api.post("/v1/vms", {"name": name, "memory_mib": 512, "vcpus": 1, "workload": workload})
            say(f"booting {name} ({workload}) on {vm['host']} at {vm['ip']}")
        for name in ("web-1", "web-2", "db-1"):
            wait_guest(api, name)
        console.print(render.vms_table(api.get("/v1/vms")))
        time.sleep(3)  # let memload run a few passes before the move
        vm = api.get("/v1/vms/web-1")
        say(f"web-1 guest before: {vm['guest']['memload']}")
        target = next(h["name"] for h in api.get("/v1/hosts") if h["name"] != vm["host"])
        say(f"\nlive-migrating web-1 (512 MiB, rewriting 100 MiB/s) {vm['host']} -> {target}")
        m = follow(api, api.post("/v1/migrations", {"vm": "web-1", "target": target}))
        console.print(render.timeline_table(m))
        console.print(render.stats_table(m))
        time.sleep(2)
        after = api.get("/v1/vms/web-1")
        say(f"web-1 now on {after['host']}; guest after: {after['guest'].get('memload')}")
        say("\nthe same again with memory verification (guest RAM compared page by page before resuming)")
        m2 = follow(api, api.post("/v1/migrations", {"vm": "web-1", "target": vm["host"], "verify_memory": True}))
        say(f"verify migration {m2['id']}: {m2['phase']}, {m2['stats'].get('pages_compared')} pages compared, "
            f"{m2['stats'].get('pages_different')} different")
        console.print(render.migrations_table(api.get("/v1/migrations")))
        errors = api.get("/v1/vms/web-1")["guest"]["memload"]["errors"]
        ok = m["phase"] == "completed" and m2["phase"] == "completed" and errors == 0
        say(f"\nmemload verification errors in the guest: {errors}; result: {'OK' if ok else 'FAILED'}")
        return 0 if ok else 1
    finally:
        if os.environ.get("FERRY_DEMO_KEEP") == "1":
            say("lab left running (FERRY_DEMO_KEEP=1); `ferry lab down` removes it")
        else:
            down(cfg, log=say)


if __name__ == "__main__":
    sys.exit(main())

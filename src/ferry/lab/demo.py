"""`make demo`: transparent maintenance of a lab fleet, from a manifest change to hosts back in service.

A 4-host lab (blue: host-1, host-2; green: host-3, host-4), 6 VMs running memload
and serving HTTP. The demo gives the blue group a new BIOS in the fleet manifest
and shows what follows: the event, the waves of drains, each guest's notice,
its target and blackout, the hosts going through maintenance and back, and a
summary. Set FERRY_DEMO_KEEP=1 to leave the lab running (then `ferry lab down`).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from rich.console import Console
from rich.table import Table

from ferry.cli import render
from ferry.cli.client import ControllerClient
from ferry.lab.config import LabConfig
from ferry.lab.lab import down, up
from ferry.lab.probe import from_client

console = Console(width=130)
VMS = [("web-1", "memload:rate=100"), ("web-2", "memload:rate=50"), ("web-3", "memload:rate=20"),
       ("api-1", "memload:rate=50"), ("api-2", "memload:rate=10"), ("db-1", "memload:rate=100")]
NEW_MANIFEST = ('[groups.blue]\nbios = "2.7"\nhypervisor = "7.2.22"\n\n'
                '[groups.green]\nbios = "1.0"\nhypervisor = "7.2.22"\n')


def say(msg: str) -> None:
    console.print(msg, highlight=False)


def wait_guests(api: ControllerClient, names: list[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            memload = (api.get(f"/v1/vms/{name}").get("guest") or {}).get("memload") or {}
            if memload.get("passes", 0) >= 1:
                pending.discard(name)
        time.sleep(0.5)
    if pending:
        raise RuntimeError(f"guests not ready within {timeout_s:.0f} s: {', '.join(sorted(pending))}")


def follow_maintenance(api: ControllerClient, known: set[str], timeout_s: float = 300) -> list[dict]:
    """Print each event's log and each migration as they happen, until all new events are finished."""
    seen_log: dict[str, int] = {}
    seen_mig: set[str] = set()
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    while time.monotonic() < deadline:
        events = [e for e in api.get("/v1/maintenance") if e["id"] not in known]
        for e in events:
            for at, text in e["log"][seen_log.get(e["id"], 0):]:
                say(f"  {render.clock(at)}  [cyan]event {e['id']}[/cyan]  {text}")
            seen_log[e["id"]] = len(e["log"])
        for m in api.get("/v1/migrations"):
            if m["id"] not in seen_mig and m["phase"] in ("completed", "aborted", "failed"):
                seen_mig.add(m["id"])
                s = m["stats"]
                say(f"  {render.clock(m['finished_at'])}  [green]migration[/green] {m['vm']} {m['source']} -> {m['target']}:"
                    f" {m['phase']}, blackout {s.get('blackout_ms')} ms, precopy {s.get('precopy_s')} s,"
                    f" {render.mib(s.get('bytes_transferred'))} sent")
        if events and all(e["state"] not in ("pending", "running") for e in events) and \
                time.monotonic() - started > 2:
            return events
        time.sleep(0.4)
    raise RuntimeError("maintenance did not finish in time")


def summary(api: ControllerClient, cfg: LabConfig) -> tuple[Table, bool]:
    vms = api.get("/v1/vms")
    migrations = [m for m in api.get("/v1/migrations") if m["reason"].startswith("maintenance")]
    done = [m for m in migrations if m["phase"] == "completed"]
    blackouts = sorted(m["stats"]["blackout_ms"] for m in done)
    errors, answering = 0, 0
    for vm in vms:
        errors += ((api.get(f"/v1/vms/{vm['name']}").get("guest") or {}).get("memload") or {}).get("errors", 1)
        answering += from_client(cfg.prefix, "http", f"http://{vm['ip']}/cgi-bin/status").returncode == 0
    per_vm = {v["name"]: sum(1 for m in done if m["vm"] == v["name"]) for v in vms}
    lost = len(VMS) - len([v for v in vms if v["state"] == "running"])
    t = Table(title="summary")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("VMs", str(len(vms)))
    t.add_row("VMs moved", str(sum(1 for n in per_vm.values() if n)))
    t.add_row("migrations per moved VM", ", ".join(f"{k}:{v}" for k, v in per_vm.items() if v) or "-")
    t.add_row("migrations failed/aborted", str(len(migrations) - len(done)))
    if blackouts:
        t.add_row("blackout min / median / max", f"{blackouts[0]:.1f} / {statistics.median(blackouts):.1f} / {blackouts[-1]:.1f} ms")
    t.add_row("memload verification errors", str(errors))
    t.add_row("VMs answering HTTP from the client", f"{answering}/{len(vms)}")
    t.add_row("VMs lost", str(lost))
    hosts = api.get("/v1/hosts")
    t.add_row("hosts active / BIOS", ", ".join(
        f"{h['name']}:{h['state']}/{api.get('/v1/hosts/' + h['name'])['inventory']['versions']['bios']}" for h in hosts))
    ok = errors == 0 and lost == 0 and answering == len(vms) and len(done) == len(migrations) and \
        all(n <= 1 for n in per_vm.values())
    return t, ok


def main() -> int:
    cfg = LabConfig(hosts=4, host_memory_mib=4096)
    say("[bold]ferry demo[/bold]: transparent maintenance of a 4-host lab fleet")
    up(cfg, log=say)
    api = ControllerClient(cfg.controller)
    try:
        for name, workload in VMS:
            vm = api.post("/v1/vms", {"name": name, "memory_mib": 512, "vcpus": 1, "workload": workload})
            say(f"booted {name} ({workload}) on {vm['host']} at {vm['ip']}")
        wait_guests(api, [n for n, _ in VMS])
        console.print(render.hosts_table(api.get("/v1/hosts")))
        console.print(render.vms_table(api.get("/v1/vms")))
        known = {e["id"] for e in api.get("/v1/maintenance")}
        say(f"\n[bold]release engineering:[/bold] BIOS 2.7 for host group blue -> editing {cfg.manifest_file}")
        cfg.manifest_file.write_text(NEW_MANIFEST)
        events = follow_maintenance(api, known)
        console.print(render.events_table(events))
        console.print(render.vms_table(api.get("/v1/vms")))
        console.print(render.migrations_table(api.get("/v1/migrations")))
        table, ok = summary(api, cfg)
        console.print(table)
        say(f"result: {'OK' if ok else 'FAILED'}")
        return 0 if ok else 1
    finally:
        if os.environ.get("FERRY_DEMO_KEEP") == "1":
            say("lab left running (FERRY_DEMO_KEEP=1); `ferry lab down` removes it")
        else:
            down(cfg, log=say)


if __name__ == "__main__":
    sys.exit(main())

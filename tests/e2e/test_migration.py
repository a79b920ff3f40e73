"""Live migration end to end: real QEMU guests in a lab fleet, memory verified."""
from __future__ import annotations

import time

import pytest

from ferry.lab.probe import from_client
from ferry.net.addressing import LabLayout
from ferry.net.fabric import LabFabric

pytestmark = pytest.mark.e2e

EXPECTED_PHASES = ["pending", "target-ready", "connected", "precopy", "blackout", "forwarding", "verifying",
                   "postmigration", "fabric-updated", "source-cleanup", "completed"]


def underlay(lab, host: str) -> str:
    return next(h["underlay_ip"] for h in lab.api.get("/v1/hosts") if h["name"] == host)


def assert_reachable(lab, vm: dict) -> None:
    reply = from_client(lab.cfg.prefix, "http", f"http://{vm['ip']}/cgi-bin/status")
    assert reply.returncode == 0, reply.stderr
    assert f'"name":"{vm["name"]}"' in reply.stdout.replace(" ", "")
    echo = from_client(lab.cfg.prefix, "echo", vm["ip"], "7", f"hello {vm['name']}")
    assert echo.returncode == 0 and echo.stdout.strip() == f"hello {vm['name']}", echo.stderr


def migrate_verified(lab, name: str, target: str) -> dict:
    m = lab.ferry_json("vm", "migrate", name, "--to", target, "--verify-memory")
    assert m["phase"] == "completed", m.get("error")
    assert [p for p, _ in m["timeline"]] == EXPECTED_PHASES
    times = [t for _, t in m["timeline"]]
    assert times == sorted(times)
    s = m["stats"]
    assert s["pages_compared"] == 512 * 1024 * 1024 // 4096
    assert s["pages_different"] == 0
    assert s["blackout_ms"] > 0 and s["qemu_downtime_ms"] is not None
    assert s["bytes_transferred"] > 0 and s["dirty_sync_count"] >= 1
    assert s["precopy_s"] > 0 and s["total_s"] >= s["precopy_s"]
    return m


def test_idle_vm_migrates_with_identical_memory(lab):
    vm = lab.create_vm("idle-1", host="host-1")
    assert_reachable(lab, vm)
    m = migrate_verified(lab, "idle-1", "host-2")
    assert (m["source"], m["target"]) == ("host-1", "host-2")
    listed = {v["name"]: v for v in lab.ferry_json("vm", "list")}
    assert listed["idle-1"]["host"] == "host-2" and listed["idle-1"]["state"] == "running"
    assert LabFabric(LabLayout(lab.cfg.prefix).fabric_ns()).lookup(vm["ip"]) == underlay(lab, "host-2")
    assert_reachable(lab, vm)
    shown = lab.ferry_json("migration", "show", m["id"])
    assert shown["stats"] == m["stats"]
    lab.ferry("vm", "delete", "idle-1")


def test_busy_vm_migrates_without_memload_errors(lab):
    vm = lab.create_vm("busy-1", workload="memload:rate=100", host="host-1")
    before = lab.wait_memload_progress("busy-1", passes=1)
    assert before["errors"] == 0
    m = migrate_verified(lab, "busy-1", "host-3")
    assert m["stats"]["max_dirty_rate_mib_s"] is None or m["stats"]["max_dirty_rate_mib_s"] >= 0
    # And back, while it keeps writing: each direction proves the other end's memory.
    time.sleep(2)
    migrate_verified(lab, "busy-1", "host-1")
    after = lab.wait_memload_progress("busy-1", passes=before["passes"] + 2)
    assert after["errors"] == 0, after
    assert after["verified_pages"] > before["verified_pages"]
    detail = lab.ferry_json("vm", "show", "busy-1")
    assert detail["host"] == "host-1" and detail["migrations"] == 2
    assert detail["agent"]["console_errors"] == 0
    assert_reachable(lab, vm)
    lab.ferry("vm", "delete", "busy-1")


def test_migration_to_a_full_host_is_refused_and_changes_nothing(lab):
    lab.create_vm("filler", memory=1800, host="host-3")
    lab.create_vm("mover", host="host-1")
    migrations_before = lab.ferry_json("migration", "list")
    result = lab.ferry("vm", "migrate", "mover", "--to", "host-3", check=False)
    assert result.returncode == 1
    assert "host-3" in result.stderr and "free" in result.stderr and "Traceback" not in result.stderr
    assert lab.ferry_json("migration", "list") == migrations_before
    vm = lab.api.get("/v1/vms/mover")
    assert vm["host"] == "host-1" and vm["state"] == "running" and vm["agent"]["runstate"] == "running"
    host3_vms = lab.api.get("/v1/hosts/host-3")["inventory"]["vms"]
    assert host3_vms == ["filler"]
    lab.ferry("vm", "delete", "filler")
    lab.ferry("vm", "delete", "mover")


def test_vm_survives_an_agent_restart(lab):
    lab.create_vm("sticky", host="host-2", workload="memload:rate=20")
    pid = lab.api.get("/v1/vms/sticky")["agent"]["pid"]
    lab.ferry("lab", "restart-agent", "host-2")
    after = lab.api.get("/v1/vms/sticky")
    assert after["agent"]["pid"] == pid and after["agent"]["runstate"] == "running"
    m = lab.ferry_json("vm", "migrate", "sticky", "--to", "host-1")
    assert m["phase"] == "completed", m.get("error")
    assert m["stats"]["blackout_ms"] > 0
    lab.ferry("vm", "delete", "sticky")

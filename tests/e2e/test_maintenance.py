"""Transparent maintenance end to end: events in, hosts emptied, repaired, back in service."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Lab, make_lab

pytestmark = pytest.mark.e2e

BLUE_27 = '[groups.blue]\nbios = "2.7"\nhypervisor = "7.2.22"\n\n[groups.green]\nbios = "1.0"\nhypervisor = "7.2.22"\n'


@pytest.fixture(scope="module")
def mlab(tmp_path_factory):
    """4 hosts (blue: host-1, host-2 in rack-1; green: host-3, host-4 in rack-2), 2 s notice, one drain at a time."""
    lab = make_lab(tmp_path_factory.mktemp("mlab"), "ftmnt", 18790, hosts=4, host_memory=2048,
                   notice_s=2, planner="max_draining_fleet = 1\n")
    yield lab
    from ferry.lab.lab import down
    down(lab.cfg, log=lambda m: None)


def wait_event(lab: Lab, event_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        e = lab.api.get(f"/v1/maintenance/{event_id}")
        if e["state"] not in ("pending", "running"):
            return e
        time.sleep(0.5)
    raise AssertionError(f"maintenance event {event_id} still {e['state']} after {timeout_s} s: {e['log'][-5:]}")


def cleanup_vms(lab: Lab) -> None:
    for v in lab.api.get("/v1/vms"):
        lab.ferry("vm", "delete", v["name"])


def notice_times(lab: Lab, vm: str) -> list[tuple[str, float]]:
    """(value, host time the metadata server sent it) from every console the VM has had."""
    found = []
    for log in sorted(Path(lab.cfg.state_dir, "hosts").glob(f"*/console-archive/{vm}.*.log")) + \
            sorted(Path(lab.cfg.state_dir, "hosts").glob(f"*/vms/{vm}/console.log")):
        for m in re.finditer(r"FERRY-MAINTENANCE-EVENT value=(\S+) .*?sent=([\d.]+)", log.read_text(errors="replace")):
            found.append((m.group(1), float(m.group(2))))
    return found


def test_manifest_change_drains_exactly_the_outdated_hosts_and_moves_each_vm_once(mlab):
    for name, host, workload in (("a1", "host-1", "memload:rate=50"), ("a2", "host-1", "idle"),
                                 ("b1", "host-2", "memload:rate=20"), ("g1", "host-3", "idle")):
        mlab.create_vm(name, host=host, workload=workload)
    before = {e["id"] for e in mlab.api.get("/v1/maintenance")}
    mlab.cfg.manifest_file.write_text(BLUE_27)
    deadline = time.monotonic() + 20
    while not (new := [e for e in mlab.api.get("/v1/maintenance") if e["id"] not in before]):
        assert time.monotonic() < deadline, "no maintenance event after the manifest changed"
        time.sleep(0.3)
    assert len(new) == 1 and new[0]["source"] == "manifest" and sorted(new[0]["hosts"]) == ["host-1", "host-2"]
    event = wait_event(mlab, new[0]["id"])
    assert event["state"] == "completed", event["log"]
    hosts = {h["name"]: h for h in mlab.api.get("/v1/hosts")}
    assert all(h["state"] == "active" for h in hosts.values())
    for name in ("host-1", "host-2"):
        assert mlab.api.get(f"/v1/hosts/{name}")["inventory"]["versions"]["bios"] == "2.7"
    migrations = mlab.api.get("/v1/migrations")
    for vm in mlab.api.get("/v1/vms"):
        moves = [m for m in migrations if m["vm"] == vm["name"]]
        if vm["name"] == "g1":
            assert moves == [] and vm["host"] == "host-3"
            continue
        assert len(moves) == 1 and moves[0]["phase"] == "completed", moves
        group = hosts[vm["host"]]["labels"]["group"]
        bios = mlab.api.get(f"/v1/hosts/{vm['host']}")["inventory"]["versions"]["bios"]
        assert bios == ("2.7" if group == "blue" else "1.0")
        # The guest saw the notice (through its metadata server) before its blackout began.
        m = moves[0]
        stop_at = dict((p, t) for p, t in m["timeline"])["blackout"]
        notified = [t for v, t in notice_times(mlab, vm["name"]) if v == "MIGRATE_ON_HOST_MAINTENANCE"]
        assert notified and notified[0] < stop_at, (vm["name"], notified, stop_at)
        assert m["timeline"][0][0] == "notified"
        if vm["spec"]["workload"].startswith("memload"):
            assert mlab.guest(vm["name"])["memload"]["errors"] == 0
    # Back on the new host the guest is told NONE again.
    for vm in ("a1", "b1"):
        deadline = time.monotonic() + 15
        while mlab.guest(vm).get("maintenance_event") != "NONE":
            assert time.monotonic() < deadline, mlab.guest(vm)
            time.sleep(0.5)
    cleanup_vms(mlab)


def test_invalid_manifest_changes_nothing(mlab):
    in_force = mlab.api.get("/v1/manifest")["in_force"]
    events = mlab.api.get("/v1/maintenance")
    mlab.cfg.manifest_file.write_text('[groups.blue]\nbios = "9.9"\n')         # hypervisor missing
    deadline = time.monotonic() + 10
    while (status := mlab.api.get("/v1/manifest"))["valid"]:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert "missing field(s): hypervisor" in status["error"]
    assert status["in_force"] == in_force
    mlab.cfg.manifest_file.write_text("[groups.blue\n")
    time.sleep(2)
    assert "syntax error" in mlab.api.get("/v1/manifest")["error"]
    assert mlab.api.get("/v1/maintenance") == events
    assert all(h["state"] == "active" for h in mlab.api.get("/v1/hosts"))
    mlab.cfg.manifest_file.write_text(BLUE_27)      # the same as in force: nothing to do
    time.sleep(2)
    assert mlab.api.get("/v1/manifest")["valid"] and mlab.api.get("/v1/maintenance") == events


def test_urgent_hardware_signal_is_served_before_planned_work(mlab):
    mlab.create_vm("p1", host="host-3")
    mlab.create_vm("u1", host="host-4")
    planned = mlab.ferry_json("maintenance", "schedule", "host-3", "--at", "+3s", "--reason", "firmware")
    mlab.ferry("host", "signal", "host-4", "ecc=50")
    deadline = time.monotonic() + 20
    while not (urgent := [e for e in mlab.api.get("/v1/maintenance") if e["source"] == "hardware"]):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert urgent[0]["urgency"] == "urgent" and urgent[0]["hosts"] == ["host-4"]
    u = wait_event(mlab, urgent[0]["id"])
    p = wait_event(mlab, planned["id"])
    assert u["state"] == p["state"] == "completed"
    assert u["started_at"] < p["started_at"] and p["started_at"] >= u["finished_at"] - 0.1
    health = mlab.api.get("/v1/hosts/host-4")["inventory"]["health"]
    assert health["ecc_corrected"] == 0       # the lab's repair reset the counter; no new event follows
    time.sleep(2)
    assert len([e for e in mlab.api.get("/v1/maintenance") if e["source"] == "hardware"]) == 1
    cleanup_vms(mlab)


def test_drain_with_no_room_is_refused_with_a_reason(mlab):
    mlab.create_vm("big", memory=1800, host="host-1")
    for i, host in enumerate(("host-2", "host-3", "host-4")):
        mlab.create_vm(f"fill{i}", memory=600, host=host)
    events = mlab.api.get("/v1/maintenance")
    result = mlab.ferry("host", "drain", "host-1", check=False)
    assert result.returncode == 1
    assert "cannot drain host-1" in result.stderr and "no room for VM big (1800 MiB)" in result.stderr
    assert mlab.api.get("/v1/maintenance") == events
    assert mlab.api.get("/v1/hosts/host-1")["state"] == "active"
    cleanup_vms(mlab)


def test_drain_undrain_and_terminate_policy(mlab):
    mlab.create_vm("mover", host="host-2")
    mlab.create_vm("stopper", host="host-2", workload="idle")
    mlab.ferry("vm", "delete", "stopper")
    mlab.ferry("vm", "create", "stopper", "--host", "host-2", "--on-host-maintenance", "terminate")
    e = mlab.ferry_json("maintenance", "schedule", "host-2")
    done = wait_event(mlab, e["id"])
    assert done["state"] == "completed", done["log"]
    assert mlab.api.get("/v1/vms/mover")["host"] != "host-2"
    stopper = mlab.api.get("/v1/vms/stopper")
    assert stopper["host"] == "host-2" and stopper["state"] == "running" and stopper["migrations"] == 0
    assert any("stopper shut down for maintenance" in text for _, text in done["log"])
    assert [m for m in mlab.api.get("/v1/migrations") if m["vm"] == "stopper"] == []
    # An operator drain leaves the host in maintenance until undrained.
    d = mlab.api.post("/v1/hosts/host-3/drain", {})
    wait_event(mlab, d["id"])
    assert mlab.api.get("/v1/hosts/host-3")["state"] == "maintenance"
    created = mlab.ferry("vm", "create", "late", "--host", "host-3", check=False)
    assert created.returncode == 1 and "maintenance" in created.stderr
    mlab.ferry("host", "undrain", "host-3")
    assert mlab.api.get("/v1/hosts/host-3")["state"] == "active"
    cleanup_vms(mlab)

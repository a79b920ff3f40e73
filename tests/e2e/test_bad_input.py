"""Every user error is one clear line on stderr, exit 1, and changes nothing."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def resident(lab):
    lab.create_vm("resident", host="host-1")
    yield "resident"
    lab.ferry("vm", "delete", "resident")


def state(lab) -> tuple:
    return (lab.ferry_json("vm", "list"), lab.ferry_json("migration", "list"), lab.ferry_json("maintenance", "list"),
            [(h["name"], h["state"], h["used_memory_mib"]) for h in lab.ferry_json("host", "list")])


@pytest.mark.parametrize("args, words", [
    (["vm", "migrate", "ghost", "--to", "host-2"], ["unknown VM", "ghost"]),
    (["vm", "migrate", "resident", "--to", "host-9"], ["unknown host", "host-9"]),
    (["vm", "migrate", "resident", "--to", "host-1"], ["already runs on host-1"]),
    (["vm", "create", "resident"], ["already exists", "resident"]),
    (["vm", "create", "huge", "--memory", "8192"], ["no host can take huge", "8192"]),
    (["vm", "create", "odd", "--workload", "memload:rate=fast"], ["malformed workload", "rate"]),
    (["vm", "create", "odd", "--workload", "cpuburn"], ["unknown workload kind"]),
    (["vm", "create", "Bad_Name"], ["invalid VM name"]),
    (["vm", "create", "odd", "--host", "host-9"], ["unknown host", "host-9"]),
    (["vm", "show", "ghost"], ["unknown VM"]),
    (["migration", "show", "nope"], ["unknown migration"]),
    (["lab", "up"], ["already running", "ferry lab down"]),
    (["maintenance", "schedule", "host-9"], ["unknown host", "host-9"]),
    (["maintenance", "schedule", "host-1", "--at", "tomorrow"], ["malformed time"]),
    (["maintenance", "cancel", "nope"], ["unknown maintenance event"]),
    (["host", "drain", "host-9"], ["unknown host", "host-9"]),
    (["host", "signal", "host-1", "ecc=lots"], ["malformed signal"]),
    (["host", "signal", "host-1", "fan=9"], ["malformed signal"]),
    (["vm", "create", "odd", "--on-host-maintenance", "explode"], ["on_host_maintenance"]),
])
def test_bad_input_gets_one_line_and_changes_nothing(lab, resident, args, words):
    before = state(lab)
    result = lab.ferry(*args, check=False)
    assert result.returncode == 1, result.stdout
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error:") and "Traceback" not in message
    for word in words:
        assert word in message, message
    assert state(lab) == before


def test_malformed_api_body_is_refused(lab, resident):
    import httpx
    reply = httpx.post(f"{lab.cfg.controller}/v1/vms", json={"name": "x1", "memory_mib": "lots"})
    assert reply.status_code == 422 and "memory_mib" in reply.json()["detail"]
    reply = httpx.post(f"{lab.cfg.controller}/v1/migrations", json={"target": "host-2"})
    assert reply.status_code == 422 and "vm" in reply.json()["detail"]

"""Post-copy safety: the link dies in the middle of post-copy; the VM is paused, not lost, and recovered."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from ferry.lab.lab import down
from ferry.net.addressing import LabLayout
from tests.e2e.conftest import make_lab

pytestmark = pytest.mark.e2e

SLOW_POSTCOPY = """
[policy.slow-postcopy]
description = "post-copy after the first pass, on a slow link (so that post-copy lasts long enough to cut)"
strategy = "postcopy"
max_bandwidth_mib_s = 48
"""


@pytest.fixture(scope="module")
def plab(tmp_path_factory):
    policies = Path("/tmp/ferry-e2e/policies-slow.toml")
    policies.parent.mkdir(parents=True, exist_ok=True)
    policies.write_text(SLOW_POSTCOPY)
    lab = make_lab(tmp_path_factory.mktemp("pcr"), "ftpcr", 18793, hosts=2, host_memory=1024,
                   migration=f'policies_file = "{policies}"\n')
    yield lab
    down(lab.cfg, log=lambda m: None)
    policies.unlink(missing_ok=True)


def fabric_link(lab, host_index: int, state: str) -> None:
    layout = LabLayout(lab.cfg.prefix)
    subprocess.run(["ip", "-n", layout.fabric_ns(), "link", "set", layout.fabric_veth(host_index), state], check=True)


def test_cutting_the_link_in_the_middle_of_post_copy_pauses_then_recovers(plab):
    plab.create_vm("pc-1", host="host-1", workload="memload:rate=800,size=384")
    plab.wait_memload_progress("pc-1", passes=2)
    m = plab.api.post("/v1/migrations", {"vm": "pc-1", "target": "host-2", "policy": "slow-postcopy",
                                         "verify_memory": True})
    deadline = time.monotonic() + 60
    while "postcopy" not in [p for p, _ in m["timeline"]]:
        assert time.monotonic() < deadline and m["phase"] not in ("aborted", "failed"), m
        time.sleep(0.2)
        m = plab.api.get(f"/v1/migrations/{m['id']}")
    time.sleep(1.0)
    fabric_link(plab, 2, "down")          # the target host falls off the fabric mid post-copy
    try:
        time.sleep(6.0)
        mid = plab.api.get(f"/v1/migrations/{m['id']}")
        assert mid["phase"] not in ("completed", "aborted", "failed")
        assert any("paused" in d["reason"] for d in mid["decisions"]), mid["decisions"]
    finally:
        fabric_link(plab, 2, "up")
    deadline = time.monotonic() + 120
    while m["phase"] not in ("completed", "aborted", "failed"):
        assert time.monotonic() < deadline, m["decisions"][-3:]
        time.sleep(0.5)
        m = plab.api.get(f"/v1/migrations/{m['id']}")
    assert m["phase"] == "completed", (m["error"], m["decisions"][-4:])
    assert m["stats"]["postcopy_recoveries"] >= 1
    assert m["stats"]["pages_different"] == 0
    vm = plab.api.get("/v1/vms/pc-1")
    assert vm["host"] == "host-2" and vm["agent"]["runstate"] == "running"
    after = plab.wait_memload_progress("pc-1", passes=plab.guest("pc-1")["memload"]["passes"] + 2)
    assert after["errors"] == 0

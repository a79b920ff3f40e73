"""The convergence engine through the whole stack: controller policy, agents, QEMU."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_a_guest_dirtying_faster_than_the_link_completes_by_post_copy_with_identical_memory(lab):
    lab.create_vm("hot-1", host="host-1", workload="memload:rate=800,size=384")
    lab.wait_memload_progress("hot-1", passes=2)
    m = lab.ferry_json("vm", "migrate", "hot-1", "--to", "host-2", "--verify-memory")
    assert m["phase"] == "completed", m.get("error")
    assert m["policy"] == "balanced" and m["prediction"]["strategy"] == "postcopy-after-first-pass"
    assert any(d["kind"] == "postcopy" and d["reason"] for d in m["decisions"]), m["decisions"]
    phases = [p for p, _ in m["timeline"]]
    assert phases.index("precopy") < phases.index("postcopy") < phases.index("postmigration")
    s = m["stats"]
    assert s["pages_different"] == 0 and s["pages_compared"] == 131072
    assert s["postcopy_s"] > 0 and s["postcopy_blocktime_ms"] is not None
    assert s["dirty_rate_measured_mib_s"] > 50
    after = lab.wait_memload_progress("hot-1", passes=lab.guest("hot-1")["memload"]["passes"] + 2)
    assert after["errors"] == 0
    lab.ferry("vm", "delete", "hot-1")


def test_no_postcopy_policy_escalates_in_precopy_and_never_uses_post_copy(lab):
    """A guest dirtying 800 MiB/s under `no-postcopy`: the engine raises the downtime and throttles;
    with the guest throttled hard pre-copy sometimes converges before the completion timeout, else
    the policy aborts. Either way no post-copy, and an abort leaves everything as it was."""
    lab.create_vm("hot-2", host="host-1", workload="memload:rate=800,size=384")
    lab.wait_memload_progress("hot-2", passes=2)
    used_before = {h["name"]: h["used_memory_mib"] for h in lab.api.get("/v1/hosts")}
    result = lab.ferry("vm", "migrate", "hot-2", "--to", "host-2", "--policy", "no-postcopy", "--json", check=False)
    m = lab.api.get("/v1/migrations", params={"vm": "hot-2"})[-1]
    assert m["policy"] == "no-postcopy"
    assert "postcopy" not in [p for p, _ in m["timeline"]]
    assert not any(d["kind"] == "postcopy" for d in m["decisions"])
    assert any(d["kind"] in ("set-downtime", "throttle") for d in m["decisions"]), m["decisions"]
    vm = lab.api.get("/v1/vms/hot-2")
    if m["phase"] == "aborted":
        assert result.returncode == 1
        assert vm["host"] == "host-1" and vm["state"] == "running" and vm["agent"]["runstate"] == "running"
        assert "hot-2" not in lab.api.get("/v1/hosts/host-2")["inventory"]["vms"]
        assert {h["name"]: h["used_memory_mib"] for h in lab.api.get("/v1/hosts")} == used_before
    else:
        assert m["phase"] == "completed" and result.returncode == 0, m.get("error")
        assert vm["host"] == "host-2"
    after = lab.wait_memload_progress("hot-2", passes=lab.guest("hot-2")["memload"]["passes"] + 1)
    assert after["errors"] == 0
    lab.ferry("vm", "delete", "hot-2")


def test_unknown_policy_is_refused(lab):
    result = lab.ferry("vm", "create", "pol-1", "--migration-policy", "yolo", check=False)
    assert result.returncode == 1 and "unknown convergence policy 'yolo'" in result.stderr

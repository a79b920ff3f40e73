"""The QEMU side of the convergence engine, against a fake QMP session."""
from __future__ import annotations

import asyncio

import pytest

from ferry.controller.convergence import BUILTIN_POLICIES, MIB, Action, ActionKind
from ferry.qemu.convergence import (
    ConvergenceError, action_command, apply_action, cancel_and_resume, postcopy_blocktime, prepare,
    resume_incoming_target, wait_migration_status,
)
from ferry.qemu.dirtyrate import measure_dirty_rate, measure_dirty_rate_detail
from ferry.qemu.session import VmEvent


class FakeQmp:
    def __init__(self, replies: dict | None = None):
        self.calls: list[tuple[str, dict | None]] = []
        self.replies = replies or {}
        self.events: list[VmEvent] = []

    async def execute(self, command, arguments=None, timeout_s=30.0):
        self.calls.append((command, arguments))
        r = self.replies.get(command, {})
        if callable(r):
            return r()
        if isinstance(r, list):
            return r.pop(0) if len(r) > 1 else r[0]
        return r

    async def wait_for_event(self, name, after=0.0, timeout_s=30.0):
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            for e in self.events:
                if e.name == name and e.at >= after:
                    return e
            await asyncio.sleep(0.005)
        raise asyncio.TimeoutError


def test_every_action_is_one_qmp_command():
    assert action_command(Action(ActionKind.SET_DOWNTIME, {"downtime_limit_ms": 50})) == \
        ("migrate-set-parameters", {"downtime-limit": 50})
    assert action_command({"kind": "set-bandwidth", "params": {"bytes_per_s": 100 * MIB}}) == \
        ("migrate-set-parameters", {"max-bandwidth": 100 * MIB})
    assert action_command(Action(ActionKind.THROTTLE, {"percent": 60}).to_dict()) == \
        ("migrate-set-parameters", {"max-cpu-throttle": 60, "cpu-throttle-increment": 60})
    assert action_command(Action(ActionKind.POSTCOPY)) == ("migrate-start-postcopy", None)
    assert action_command(Action(ActionKind.ABORT, {"retry_after_s": 300})) == ("migrate_cancel", None)
    with pytest.raises(ConvergenceError):
        action_command({"kind": "reboot"})
    with pytest.raises(ConvergenceError):
        action_command({"kind": "throttle", "params": {"percent": 100}})


async def test_apply_action_sends_the_command():
    q = FakeQmp()
    out = await apply_action(q, Action(ActionKind.POSTCOPY, {}, "because").to_dict())
    assert q.calls == [("migrate-start-postcopy", None)]
    assert out["command"] == "migrate-start-postcopy" and out["at"] > 0


async def test_prepare_sets_target_then_source():
    src, dst = FakeQmp(), FakeQmp()
    await prepare(src, dst, BUILTIN_POLICIES["balanced"].qemu_setup(100 * MIB))
    assert [c[0] for c in dst.calls] == ["migrate-set-capabilities"]
    caps = {c["capability"]: c["state"] for c in dst.calls[0][1]["capabilities"]}
    assert caps["postcopy-ram"] and caps["postcopy-blocktime"] and caps["events"]
    assert [c[0] for c in src.calls] == ["migrate-set-capabilities", "migrate-set-parameters"]
    scaps = {c["capability"]: c["state"] for c in src.calls[0][1]["capabilities"]}
    assert scaps["postcopy-ram"] and scaps["auto-converge"] and not scaps["xbzrle"]
    assert src.calls[1][1]["max-bandwidth"] == 100 * MIB
    # a policy object works too
    src2, dst2 = FakeQmp(), FakeQmp()
    await prepare(src2, dst2, BUILTIN_POLICIES["no-postcopy"])
    assert {c["capability"]: c["state"] for c in src2.calls[0][1]["capabilities"]}["postcopy-ram"] is False
    with pytest.raises(ConvergenceError):
        await prepare(src2, dst2, {"source": {}})


async def test_measure_dirty_rate_uses_page_sampling_and_polls():
    q = FakeQmp({"query-dirty-rate": [{"status": "measuring"}, {"status": "measured", "dirty-rate": 384,
                                                                "mode": "page-sampling"}]})
    rate = await measure_dirty_rate(q, calc_time_s=1, sample_pages=512)
    assert rate == 384 * MIB
    assert q.calls[0] == ("calc-dirty-rate", {"calc-time": 1, "sample-pages": 512, "mode": "page-sampling"})
    with pytest.raises(ValueError):
        await measure_dirty_rate(q, calc_time_s=0.5)


async def test_measure_dirty_rate_times_out():
    from ferry.qemu.dirtyrate import DirtyRateError
    q = FakeQmp({"query-dirty-rate": {"status": "measuring"}})
    with pytest.raises(DirtyRateError):
        await measure_dirty_rate_detail(q, calc_time_s=1, timeout_s=1.2)


async def test_cancel_and_resume_restarts_a_paused_source():
    q = FakeQmp({"query-migrate": [{"status": "active"}, {"status": "cancelling"}, {"status": "cancelled"}],
                 "query-status": [{"status": "paused"}, {"status": "running"}]})
    out = await cancel_and_resume(q)
    assert out == {"status": "cancelled", "runstate": "running"}
    assert ("migrate_cancel", None) in q.calls and ("cont", None) in q.calls


async def test_cancel_refused_in_postcopy_and_left_alone_when_completed():
    with pytest.raises(ConvergenceError, match="post-copy"):
        await cancel_and_resume(FakeQmp({"query-migrate": {"status": "postcopy-active"}}))
    q = FakeQmp({"query-migrate": {"status": "completed"}, "query-status": {"status": "postmigrate"}})
    assert await cancel_and_resume(q) == {"status": "completed", "runstate": "postmigrate"}
    assert ("cont", None) not in q.calls and ("migrate_cancel", None) not in q.calls


async def test_target_helpers():
    q = FakeQmp({"query-migrate": {"status": "completed", "postcopy-blocktime": 42,
                                   "postcopy-vcpu-blocktime": [42]}})
    assert (await postcopy_blocktime(q))["postcopy_blocktime_ms"] == 42
    assert await resume_incoming_target(q) > 0 and q.calls[-1] == ("cont", None)
    q.events = [VmEvent("MIGRATION", 10.0, {"status": "active"})]

    async def later():
        await asyncio.sleep(0.05)
        q.events.append(VmEvent("MIGRATION", 11.0, {"status": "completed"}))
    asyncio.get_running_loop().create_task(later())
    ev = await wait_migration_status(q, "completed", 5.0, 5)
    assert ev.at == 11.0
    with pytest.raises(asyncio.TimeoutError):
        await wait_migration_status(q, "postcopy-active", 5.0, 0.2)

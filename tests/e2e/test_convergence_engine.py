"""The convergence engine against real QEMU (TCG): one guest, three migrations.

A 512 MiB guest whose memload rewrites 384 MiB at 800 MiB/s (pti=on, no NIC):

1. policy no-postcopy at a 100 MiB/s cap cannot converge: it escalates by its
   schedule and aborts at its completion timeout; the VM keeps running on its
   source with memory intact (memload verifies every page);
2. policy balanced at a 200 MiB/s cap switches to post-copy after the first pass
   (its decision log says so, with the reason), the target runs the VM, memload
   finds no bad page and the target reports its post-copy block time;
3. the same, in verification mode (the target stays paused until post-copy has
   delivered every page): the page digests of both ends are identical.

No timing assertions beyond the policy's own timeout (benchmarks measure time).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.convergence.harness import boot_guest, memload_size_mib, run_ferry, start_target
from ferry.controller.convergence import BUILTIN_POLICIES, MIB

pytestmark = pytest.mark.e2e

MEMORY, RATE = 512, 800
SIZE = memload_size_mib(MEMORY)          # 384 MiB


async def test_convergence_engine_abort_then_postcopy(tmp_path: Path):
    assert SIZE == 384
    run_dir = tmp_path / "vms"
    guests = []
    try:
        src = await boot_guest("cv-e2e-a", MEMORY, RATE, run_dir)
        guests.append(src)

        # 1. no-postcopy at 100 MiB/s: aborts at its timeout, the source keeps running
        no_pc = BUILTIN_POLICIES["no-postcopy"]
        t1 = await start_target("cv-e2e-b", src, run_dir)
        guests.append(t1)
        r = await run_ferry(src, t1, no_pc, 100 * MIB, 120, RATE, SIZE, tmp_path / "dumps", 256 * MIB)
        assert r.outcome == "aborted", (r.outcome, r.error, r.decisions)
        assert not r.completed
        kinds = [d["kind"] for d in r.decisions]
        assert "postcopy" not in kinds and kinds.count("abort") == 1
        abort = next(d for d in r.decisions if d["kind"] == "abort")
        assert "not completed within" in abort["reason"] or "no progress" in abort["reason"]
        assert abort["elapsed_s"] <= no_pc.completion_timeout_s(MEMORY * MIB) + 2
        assert [a["command"] for a in r.actions_applied][-1] == "migrate_cancel"
        assert r.source_runstate_after == "running"
        assert r.memcheck["runstate"] == "running" and r.memcheck["alive"]
        assert r.memcheck["memload_errors"] == 0 and r.memcheck["kernel_errors"] == 0
        await t1.stop()
        guests.remove(t1)

        # 2. balanced at 200 MiB/s: post-copy after the first pass, live
        balanced = BUILTIN_POLICIES["balanced"]
        t2 = await start_target("cv-e2e-c", src, run_dir)
        guests.append(t2)
        r = await run_ferry(src, t2, balanced, 200 * MIB, 120, RATE, SIZE, tmp_path / "dumps", 256 * MIB)
        assert r.completed and r.outcome == "completed", (r.outcome, r.error, r.decisions)
        assert r.mode == "postcopy"
        switch = [d for d in r.decisions if d["kind"] == "postcopy"]
        assert len(switch) == 1 and "post-copy" in switch[0]["reason"] and len(switch[0]["reason"]) > 30
        assert any("post-copy active" in d["reason"] for d in r.decisions)
        assert r.blackout_ms is not None and r.blackout_ms > 0
        assert r.postcopy_blocktime_ms is not None
        assert r.memcheck["memload_errors"] == 0 and r.memcheck["kernel_errors"] == 0
        assert r.memcheck["alive"] and r.memcheck["ok"]
        await src.stop()
        guests.remove(src)

        # 3. the same guest again, verification mode: identical memory after post-copy
        t3 = await start_target("cv-e2e-d", t2, run_dir)
        guests.append(t3)
        r = await run_ferry(t2, t3, balanced, 200 * MIB, 120, RATE, SIZE, tmp_path / "dumps", 256 * MIB,
                            live_postcopy=False, arm="ferry-verify")
        assert r.completed and r.mode == "postcopy", (r.outcome, r.mode, r.decisions)
        assert r.memcheck["digests"] == "identical", r.memcheck
        assert r.memcheck["pages_compared"] == MEMORY * 256
        assert r.memcheck["memload_errors"] == 0 and r.memcheck["ok"]
    finally:
        for g in guests:
            await g.stop()

"""Check the benchmark's pre-copy blackout method against a target that starts by itself.

    python -m bench.convergence.calibrate [--runs 4] [--rate 50] [--memory 512]

The benchmark starts targets with -S (to compare memory while both ends are
paused) and computes the pre-copy blackout as
    (target MIGRATION completed - source STOP) + (target RESUME - our cont).
Here the same guest is migrated back and forth with the same settings, alternately
into a -S target (that formula) and into a target without -S, where the blackout
is simply source STOP -> target RESUME and, in the same run, the target's
`completed` event can be compared with its RESUME (QEMU starts the vCPUs first,
then announces `completed`). Prints both distributions.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "bench.convergence"

from bench.convergence.harness import _event_at, boot_guest, listen, start_target  # noqa: E402
from ferry.controller.convergence import BUILTIN_POLICIES  # noqa: E402
from ferry.qemu.convergence import prepare, wait_migration_status  # noqa: E402
from ferry.qemu.migration import sample  # noqa: E402


async def one(src, dst, paused: bool) -> dict:
    setup = BUILTIN_POLICIES["no-postcopy"].qemu_setup()
    await prepare(src.qmp, dst.qmp, setup)
    uri = await listen(dst)
    t = time.time()
    await src.qmp.execute("migrate", {"uri": uri})
    while not (s := await sample(src.qmp)).finished:
        await asyncio.sleep(0.1)
    assert s.status == "completed", s
    await wait_migration_status(dst.qmp, "completed", t - 0.01, 30)
    stop = _event_at(src.qmp, "STOP", t - 0.01)
    done = _event_at(dst.qmp, "MIGRATION", t - 0.01, "completed")
    out = {"paused_target": paused, "qemu_downtime_ms": s.downtime_ms}
    if paused:
        await asyncio.sleep(0.5)               # stands in for the memory comparison
        cont = time.time()
        await dst.qmp.execute("cont")
        resume = (await dst.qmp.wait_for_event("RESUME", after=cont - 0.01, timeout_s=10)).at
        out["blackout_ms"] = round(((done - stop) + (resume - cont)) * 1000, 2)
        out["cont_to_resume_ms"] = round((resume - cont) * 1000, 3)
    else:
        resume = await dst.qmp.wait_for_event("RESUME", after=t - 0.01, timeout_s=10)
        out["blackout_ms"] = round((resume.at - stop) * 1000, 2)
        out["completed_minus_resume_ms"] = round((done - resume.at) * 1000, 3)
    return out


async def main_async(args) -> None:
    work = Path(args.workdir)
    g = await boot_guest("cal-0", args.memory, args.rate, work)
    guests = [g]
    results = []
    try:
        for i in range(2 * args.runs):
            paused = i % 2 == 0
            dst = await start_target(f"cal-{i + 1}", g, work, paused=paused)
            guests.append(dst)
            r = await one(g, dst, paused)
            results.append(r)
            print(json.dumps(r), flush=True)
            await g.stop()
            guests.remove(g)
            g = dst
            await asyncio.sleep(1.0)
    finally:
        for x in guests:
            await x.stop()
    for paused in (True, False):
        xs = [r["blackout_ms"] for r in results if r["paused_target"] is paused]
        qs = [r["qemu_downtime_ms"] for r in results if r["paused_target"] is paused]
        print(f"{'-S target (benchmark formula)' if paused else 'autostart target (STOP->RESUME)'}: "
              f"blackout median {statistics.median(xs):.2f} ms, range {min(xs):.2f}-{max(xs):.2f}; "
              f"QEMU downtime median {statistics.median(qs):.0f} ms")
    extra = [r["completed_minus_resume_ms"] for r in results if "completed_minus_resume_ms" in r]
    conts = [r["cont_to_resume_ms"] for r in results if "cont_to_resume_ms" in r]
    print(f"autostart: target 'completed' event after RESUME by {statistics.median(extra):.3f} ms (median); "
          f"-S: cont -> RESUME {statistics.median(conts):.3f} ms (median)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--rate", type=int, default=50)
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/ferry-bench-calibrate")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()

"""Measure how fast a running guest dirties its memory (QMP `calc-dirty-rate`).

QEMU 7.2 under TCG: only the `page-sampling` mode works (it hashes
`sample-pages` random pages per GiB, waits `calc-time` seconds and counts the
pages whose hash changed). `dirty-bitmap` and `dirty-ring` crash QEMU under
TCG, and dirty-limit does not exist in 7.2, so this module refuses them.

Page sampling counts a page once however often it was written, so the result
saturates at working-set / calc-time: a guest rewriting 384 MiB at 800 MiB/s
measures ~384 MiB/s over 1 s. For pre-copy that is the quantity that matters
(what a pass has to send again is at most the working set), and the
prediction model in `ferry.controller.convergence` treats it that way.
"""
from __future__ import annotations

import asyncio
import time

from ferry.qemu.session import QmpSession

MIB = 1024 * 1024


class DirtyRateError(RuntimeError):
    pass


async def measure_dirty_rate(qmp: QmpSession, calc_time_s: int = 1, sample_pages: int = 512,
                             timeout_s: float | None = None) -> float:
    """The guest's dirty rate in bytes/s (QEMU reports whole MiB/s), measured over calc_time_s.

    Takes calc_time_s plus a few tens of ms; the guest keeps running. Raises
    DirtyRateError if QEMU does not deliver a measurement in time.
    """
    result = await measure_dirty_rate_detail(qmp, calc_time_s, sample_pages, timeout_s)
    return result["dirty_rate_bytes_s"]


async def measure_dirty_rate_detail(qmp: QmpSession, calc_time_s: int = 1, sample_pages: int = 512,
                                    timeout_s: float | None = None) -> dict:
    """Like measure_dirty_rate, with QEMU's full answer and the wall time it took."""
    if int(calc_time_s) != calc_time_s or calc_time_s < 1:
        raise ValueError("calc_time_s must be a whole number of seconds >= 1 (QEMU 7.2 has no finer unit)")
    if not 0 < sample_pages <= 100_000:
        raise ValueError("sample_pages must be between 1 and 100000 (pages per GiB)")
    started = time.monotonic()
    await qmp.execute("calc-dirty-rate", {"calc-time": int(calc_time_s), "sample-pages": int(sample_pages),
                                          "mode": "page-sampling"})
    deadline = started + (timeout_s if timeout_s is not None else calc_time_s + 5.0)
    await asyncio.sleep(max(0.0, calc_time_s - 0.02))
    while True:
        reply = await qmp.execute("query-dirty-rate")
        if reply.get("status") == "measured":
            break
        if time.monotonic() > deadline:
            raise DirtyRateError(f"calc-dirty-rate gave no result within {deadline - started:.1f} s "
                                 f"(status {reply.get('status')!r})")
        await asyncio.sleep(0.02)
    rate_mib_s = float(reply.get("dirty-rate") or 0)
    return {
        "dirty_rate_bytes_s": rate_mib_s * MIB,
        "dirty_rate_mib_s": rate_mib_s,
        "calc_time_s": int(calc_time_s),
        "sample_pages": int(sample_pages),
        "mode": reply.get("mode", "page-sampling"),
        "took_s": round(time.monotonic() - started, 3),
    }

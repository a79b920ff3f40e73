"""Real QEMU guests for the convergence benchmark and its end-to-end test.

No network, no agents: each guest is a QEMU process without a NIC, and both ends of
a migration run on this machine, the stream over tcp 127.0.0.1. Two arms migrate
the same guest:

- plain: QEMU's defaults, nothing changed but `max-bandwidth` when the cell has a
  bandwidth cap; just `migrate`, cancelled at the time limit;
- ferry: dirty-rate measurement + link probe + prediction, `prepare` with the
  policy's set-up, and the monitor loop running `decide()` / `apply_action()`.

How each number is measured (see docs/convergence.md):

- Targets start with -S so that memory can be compared page by page while both
  ends are paused. For a pre-copy run the blackout is therefore
  (target MIGRATION completed - source STOP) + (target RESUME - our `cont`):
  the target's `completed` event comes after the point where an autostarting
  target would already resume, so this never understates it; the verification
  time in between is left out (it is reported separately).
- For post-copy the target must run during post-copy, so ferry's arm sends `cont`
  to the target together with `migrate-start-postcopy` (`resume_incoming_target`:
  on a target still receiving, `cont` only sets autostart, so it starts exactly
  like a target started without -S); the blackout is source STOP -> target RESUME
  as recorded.
  Page digests cannot be compared afterwards (the guest has been writing on the
  target while the source stayed frozen), so memory is checked by memload inside
  the guest (every page verified before it is rewritten; one full pass is awaited),
  the guest kernel's console, a liveness check (the guest still dirties memory at
  its rate), and optionally a second, verification migration in which the target
  stays paused until post-copy has delivered every page, then digests are compared.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ferry.controller.convergence import (
    MIB, ActionKind, ConvergencePolicy, Sample, decide, hard_stop, plan, start,
)
from ferry.qemu.convergence import (
    apply_action, cancel_and_resume, postcopy_blocktime, prepare, resume_incoming_target,
    wait_migration_status,
)
from ferry.qemu.dirtyrate import measure_dirty_rate_detail
from ferry.qemu.image import build_image, find_image, kernel_cmdline
from ferry.qemu.launch import LaunchSpec, start_qemu, stop_qemu
from ferry.qemu.memcheck import differing_pages, page_digests
from ferry.qemu.migration import incoming_port, sample
from ferry.qemu.session import QmpSession

QEMU_DEFAULT_BANDWIDTH = 128 * MIB      # QEMU 7.2's max-bandwidth default
QEMU_DEFAULT_DOWNTIME_MS = 300          # QEMU 7.2's downtime-limit default
KERNEL_TROUBLE = re.compile(r"Oops|BUG:|Kernel panic|general protection|segfault|Call Trace")
PLACEHOLDER_IP, PLACEHOLDER_GW = "10.0.0.2", "10.0.0.1"   # no NIC: the guest only records them


def memload_size_mib(memory_mib: int) -> int:
    """The working set memload rewrites: 3/4 of the guest (384 MiB of 512, 768 of 1024)."""
    return memory_mib * 3 // 4


# ---- guests --------------------------------------------------------------------------------

@dataclass
class Guest:
    spec: LaunchSpec
    pid: int
    qmp: QmpSession
    console_from: int = 0          # console length when this guest took over the VM

    @property
    def name(self) -> str:
        return self.spec.name

    def console(self) -> str:
        try:
            return Path(self.spec.console_log).read_text(errors="replace")
        except OSError:
            return ""

    def new_console(self) -> str:
        return self.console()[self.console_from:]

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.close()
        with contextlib.suppress(Exception):
            await stop_qemu(self.pid, self.spec.name)


def _spec(name: str, memory_mib: int, size_mib: int, rate_mib_s: int, run_dir: Path,
          incoming: bool) -> LaunchSpec:
    image = find_image() or build_image(log=lambda m: None)
    return LaunchSpec(
        name=name, memory_mib=memory_mib, vcpus=1, kernel=str(image.kernel), initrd=str(image.initrd),
        cmdline=kernel_cmdline(name, PLACEHOLDER_IP, PLACEHOLDER_GW, memload_size_mib=size_mib,
                               memload_rate_mib_s=rate_mib_s),       # pti=on: see ferry.qemu.image
        mac="52:54:00:00:00:01", tap=None, run_dir=str(run_dir / name),
        incoming=incoming, start_paused=incoming)


async def _launch(spec: LaunchSpec) -> Guest:
    shutil.rmtree(spec.run_dir, ignore_errors=True)
    pid = await start_qemu(spec)
    qmp = QmpSession(spec.name, spec.qmp_socket)
    try:
        await qmp.connect()
    except Exception:
        await stop_qemu(pid, spec.name)
        raise
    return Guest(spec, pid, qmp)


async def boot_guest(name: str, memory_mib: int, rate_mib_s: int, run_dir: Path,
                     size_mib: int | None = None, timeout_s: float = 60.0, warmup_s: float = 1.5) -> Guest:
    """A running guest whose memload has filled its working set and is rewriting it."""
    size = size_mib or memload_size_mib(memory_mib)
    g = await _launch(_spec(name, memory_mib, size, rate_mib_s, run_dir, incoming=False))
    deadline = time.monotonic() + timeout_s
    while True:
        text = g.console()
        if "FERRY-GUEST-READY" in text and "MEMLOAD FILLED" in text:
            break
        if "memload did not start" in text or "Out of memory" in text or "Kernel panic" in text:
            await g.stop()
            raise RuntimeError(f"guest {name} failed to start memload: {text.strip().splitlines()[-1]}")
        if time.monotonic() > deadline:
            await g.stop()
            raise RuntimeError(f"guest {name} not ready within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)
    await asyncio.sleep(warmup_s)
    return g


async def start_target(name: str, like: Guest, run_dir: Path, paused: bool = True) -> Guest:
    """An empty QEMU waiting for `like`'s VM: -incoming defer, -S (unless paused=False)."""
    s = like.spec
    spec = LaunchSpec(name=name, memory_mib=s.memory_mib, vcpus=s.vcpus, kernel=s.kernel, initrd=s.initrd,
                      cmdline=s.cmdline, mac=s.mac, tap=None, run_dir=str(run_dir / name),
                      incoming=True, start_paused=paused)
    return await _launch(spec)


async def listen(target: Guest) -> str:
    await target.qmp.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = incoming_port(await target.qmp.execute("query-migrate"))
    if port is None:
        raise RuntimeError(f"target {target.name} reports no listening port")
    return f"tcp:127.0.0.1:{port}"


# ---- link probe ----------------------------------------------------------------------------

async def probe_link(host: str = "127.0.0.1", seconds: float = 0.25) -> float:
    """Bytes/s one TCP stream achieves to `host` (a sink on this machine)."""
    received = 0

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while chunk := await reader.read(1 << 20):
            received += len(chunk)
        writer.close()

    server = await asyncio.start_server(sink, host, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(host, port)
        buf = b"\x5a" * (1 << 20)
        t0 = time.monotonic()
        sent = 0
        while time.monotonic() - t0 < seconds:
            writer.write(buf)
            await writer.drain()
            sent += len(buf)
        writer.close()
        await writer.wait_closed()
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    return sent / elapsed


# ---- results -------------------------------------------------------------------------------

@dataclass
class RunResult:
    arm: str                                  # plain | ferry | ferry-verify
    policy: str | None = None
    outcome: str = "failed"                   # completed | did-not-converge | aborted | failed
    completed: bool = False
    completed_in_limit: bool = False
    mode: str | None = None                   # precopy | postcopy
    blackout_ms: float | None = None
    blackout_method: str | None = None
    blackout_raw_ms: float | None = None      # STOP -> RESUME as recorded (incl. verification when paused)
    qemu_downtime_ms: float | None = None
    postcopy_blocktime_ms: float | None = None
    postcopy_vcpu_blocktime_ms: list | None = None
    precopy_s: float | None = None            # migrate -> source STOP
    migration_s: float | None = None          # QEMU total-time (migrate -> completed on the source)
    pre_s: float = 0.0                        # ferry's measurement before migrate
    total_s: float | None = None              # pre_s + migration_s (or time to abort/cancel)
    bytes_sent: int | None = None
    dirty_sync_count: int | None = None
    settings: dict = field(default_factory=dict)
    prediction: dict | None = None
    measured: dict = field(default_factory=dict)
    decisions: list = field(default_factory=list)
    actions_applied: list = field(default_factory=list)
    memcheck: dict = field(default_factory=dict)
    error: str | None = None
    source_runstate_after: str | None = None
    samples: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _compact(s, t0: float, now: float) -> list:
    return [round(now - t0, 2), s.status, s.remaining, s.transferred, s.dirty_sync_count,
            round(s.dirty_rate_mib_s, 1), round(s.mbps, 1)]


def _event_at(qmp: QmpSession, name: str, since: float, status: str | None = None) -> float | None:
    for e in qmp.events:
        if e.name == name and e.at >= since and (status is None or e.data.get("status") == status):
            return e.at
    return None


def _errors(text: str) -> dict:
    mem = [l.strip() for l in text.splitlines() if "MEMLOAD ERROR" in l]
    kern = [l.strip() for l in text.splitlines() if KERNEL_TROUBLE.search(l)]
    return {"memload_errors": len(mem), "memload_error_lines": mem[:5],
            "kernel_errors": len(kern), "kernel_error_lines": kern[:5]}


async def _post_checks(guest: Guest, rate_mib_s: int, size_mib: int, since_console: int) -> dict:
    """On the guest now running the VM: wait a full memload pass, check liveness and consoles."""
    if rate_mib_s:
        wait_s = min(10.0, max(2.0, size_mib / rate_mib_s * 1.2 + 0.5))
    else:
        wait_s = 4.0      # idle memload re-verifies everything every 3 s
    alive: dict[str, Any] = {}
    t0 = time.monotonic()
    if rate_mib_s:
        with contextlib.suppress(Exception):
            d = await measure_dirty_rate_detail(guest.qmp, 1, 512)
            alive = {"target_dirty_rate_mib_s": d["dirty_rate_mib_s"]}
    await asyncio.sleep(max(0.0, wait_s - (time.monotonic() - t0)))
    text = guest.console()[since_console:]
    out = {"waited_s": round(wait_s, 1), **alive, **_errors(text)}
    runstate = (await guest.qmp.execute("query-status"))["status"]
    out["runstate"] = runstate
    # memload at rate R over a working set W measures ~min(R, W) MiB/s over 1 s; a dead guest 0
    out["alive"] = runstate == "running" and (not rate_mib_s or alive.get("target_dirty_rate_mib_s", 0) > 0)
    return out


async def _compare_memory(src: Guest, dst: Guest, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    a = await page_digests(src.qmp, src.spec.memory_mib, str(workdir))
    b = await page_digests(dst.qmp, dst.spec.memory_mib, str(workdir))
    diff = differing_pages(a, b)
    return {"digests": "identical" if not diff else f"{len(diff)} pages differ",
            "pages_compared": max(len(a), len(b)) // 8, "pages_different": len(diff),
            "first_different": [hex(p * 4096) for p in diff[:5]], "verify_s": round(time.monotonic() - t0, 2)}


async def _finish_completed(r: RunResult, src: Guest, dst: Guest, t_mig: float, final, rate: int, size: int,
                            workdir: Path, released: bool) -> None:
    """`released`: we sent `cont` to the target during the migration (post-copy, live)."""
    r.qemu_downtime_ms = final.downtime_ms
    r.bytes_sent = final.transferred
    r.dirty_sync_count = final.dirty_sync_count
    r.migration_s = round((final.total_time_ms or 0) / 1000, 3)
    stop_at = _event_at(src.qmp, "STOP", t_mig - 0.01)
    postcopy = _event_at(src.qmp, "MIGRATION", t_mig - 0.01, "postcopy-active") is not None
    r.mode = "postcopy" if postcopy else "precopy"
    r.precopy_s = round(stop_at - t_mig, 3) if stop_at else None
    # the target finishes loading on its own; wait for it
    with contextlib.suppress(asyncio.TimeoutError):
        await wait_migration_status(dst.qmp, "completed", t_mig - 0.01, 30)
    target_done = _event_at(dst.qmp, "MIGRATION", t_mig - 0.01, "completed")
    mem: dict[str, Any] = {}
    if postcopy:
        bt = await postcopy_blocktime(dst.qmp)
        r.postcopy_blocktime_ms, r.postcopy_vcpu_blocktime_ms = bt["postcopy_blocktime_ms"], bt["vcpu_blocktime_ms"]
    if released:
        with contextlib.suppress(asyncio.TimeoutError):
            await dst.qmp.wait_for_event("RESUME", after=t_mig - 0.01, timeout_s=10)
        resume_at = _event_at(dst.qmp, "RESUME", t_mig - 0.01)
        r.blackout_method = "source STOP -> target RESUME (target autostarted: cont sent with the post-copy switch)"
        if stop_at and resume_at:
            r.blackout_ms = r.blackout_raw_ms = round((resume_at - stop_at) * 1000, 2)
        mem["digests"] = ("n/a (post-copy: the guest ran on the target while the source stayed frozen)" if postcopy
                          else "n/a (pre-copy completed after the post-copy request; the target autostarted)")
    else:
        # both ends paused: compare memory, then resume the target
        mem.update(await _compare_memory(src, dst, workdir))
        cont_sent = time.time()
        await dst.qmp.execute("cont")
        resume = await dst.qmp.wait_for_event("RESUME", after=cont_sent - 0.01, timeout_s=10)
        if stop_at:
            r.blackout_raw_ms = round((resume.at - stop_at) * 1000, 2)
        if postcopy:
            r.blackout_method = "n/a: verification run (target paused until post-copy delivered every page)"
        elif stop_at and target_done:
            r.blackout_ms = round(((target_done - stop_at) + (resume.at - cont_sent)) * 1000, 2)
            r.blackout_method = ("(target MIGRATION completed - source STOP) + (target RESUME - cont); "
                                 "memory verification excluded")
    dst.console_from = 0
    mem.update(await _post_checks(dst, rate, size, 0))
    src_err = _errors(src.new_console())
    mem["source_memload_errors"] = src_err["memload_errors"]
    mem["source_kernel_errors"] = src_err["kernel_errors"]
    digest_ok = mem.get("digests") == "identical" or str(mem.get("digests", "")).startswith("n/a")
    mem["ok"] = bool(digest_ok and mem["memload_errors"] == 0 and mem["kernel_errors"] == 0
                     and mem["source_memload_errors"] == 0 and mem["alive"])
    r.memcheck = mem
    r.completed = True
    r.outcome = "completed"


async def _finish_cancelled(r: RunResult, src: Guest, rate: int, size: int) -> None:
    mem = await _post_checks(src, rate, size, src.console_from)
    mem["digests"] = "n/a (not migrated; the VM kept running on its source)"
    mem["ok"] = mem["memload_errors"] == 0 and mem["kernel_errors"] == 0 and mem["alive"]
    r.memcheck = mem
    r.source_runstate_after = mem["runstate"]


# ---- the two arms --------------------------------------------------------------------------

async def run_plain(src: Guest, dst: Guest, cap_bytes_s: int | None, limit_s: float, rate: int, size: int,
                    workdir: Path, interval_s: float = 0.2) -> RunResult:
    """QEMU's defaults: nothing set on the source except max-bandwidth for a capped cell."""
    r = RunResult(arm="plain")
    await dst.qmp.execute("migrate-set-capabilities",           # the target's events only (for timing);
                          {"capabilities": [{"capability": "events", "state": True}]})  # no effect on the source
    if cap_bytes_s:
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": int(cap_bytes_s)})
    params = await src.qmp.execute("query-migrate-parameters")
    r.settings = {"max_bandwidth_mib_s": params["max-bandwidth"] / MIB,
                  "downtime_limit_ms": params["downtime-limit"], "capabilities": "QEMU defaults"}
    uri = await listen(dst)
    t_mig = time.time()
    src.console_from = len(src.console())
    await src.qmp.execute("migrate", {"uri": uri})
    final = None
    last = None
    while True:
        s = await sample(src.qmp)
        now = time.time()
        r.samples.append(_compact(s, t_mig, now))
        if s.finished:
            final = s
            break
        last = s
        if now - t_mig > limit_s:
            break
        await asyncio.sleep(interval_s)
    if final is not None and final.status == "completed":
        await _finish_completed(r, src, dst, t_mig, final, rate, size, workdir, False)
        r.total_s = r.migration_s
        r.completed_in_limit = r.total_s is not None and r.total_s <= limit_s
        return r
    if final is None:
        rb = await cancel_and_resume(src.qmp)
        r.outcome = "did-not-converge" if rb["status"] == "cancelled" else rb["status"]
        r.error = f"not completed within {limit_s:.0f} s; cancelled"
        if rb["status"] == "completed":     # finished just as we cancelled
            fin = await sample(src.qmp)
            await _finish_completed(r, src, dst, t_mig, fin, rate, size, workdir, False)
            r.total_s = r.migration_s
            return r
    else:
        r.outcome = "failed"
        r.error = f"QEMU: {final.status}: {final.error}"
    r.total_s = round(time.time() - t_mig, 2)
    r.bytes_sent = last.transferred if last else None
    r.dirty_sync_count = last.dirty_sync_count if last else None
    await _finish_cancelled(r, src, rate, size)
    return r


async def run_ferry(src: Guest, dst: Guest, policy: ConvergencePolicy, cap_bytes_s: int | None, limit_s: float,
                    rate: int, size: int, workdir: Path, engine_bytes_s: float,
                    live_postcopy: bool = True, arm: str = "ferry") -> RunResult:
    """ferry's engine: measure, predict, prepare, migrate, decide() on every sample."""
    r = RunResult(arm=arm, policy=policy.name)
    t_arm = time.time()
    src.console_from = len(src.console())
    memory_bytes = src.spec.memory_mib * MIB
    dr = await measure_dirty_rate_detail(src.qmp, 1, 512)
    link = await probe_link()
    candidates = {"link probe": link, "engine estimate": engine_bytes_s}
    if cap_bytes_s:
        candidates["bandwidth cap"] = cap_bytes_s
    bw_source = min(candidates, key=candidates.get)
    bandwidth = candidates[bw_source]
    r.measured = {"dirty_rate_mib_s": dr["dirty_rate_mib_s"], "dirty_rate_took_s": dr["took_s"],
                  "link_mib_s": round(link / MIB, 1), "engine_estimate_mib_s": round(engine_bytes_s / MIB, 1),
                  "bandwidth_for_prediction_mib_s": round(bandwidth / MIB, 1), "bandwidth_from": bw_source}
    pred = plan(policy, memory_bytes, dr["dirty_rate_bytes_s"], bandwidth)
    r.prediction = pred.to_dict()
    setup = policy.qemu_setup(cap_bytes_s)
    r.settings = setup
    await prepare(src.qmp, dst.qmp, setup)
    uri = await listen(dst)
    state = start(policy, pred, memory_bytes, time.time())
    t_mig = time.time()
    r.pre_s = round(t_mig - t_arm, 3)
    await src.qmp.execute("migrate", {"uri": uri})
    released = False
    final = None
    last = None
    aborted = False
    try:
        while True:
            s = await sample(src.qmp)
            now = time.time()
            r.samples.append(_compact(s, t_mig, now))
            actions, state = decide(policy, state, Sample.from_dict(s.to_dict()), now)
            if now - t_arm > limit_s and not actions:
                actions, state = hard_stop(policy, state, Sample.from_dict(s.to_dict()), now,
                                           f"benchmark time limit of {limit_s:.0f} s reached", abort=True)
            for a in actions:
                applied = await apply_action(src.qmp, a.to_dict())
                r.actions_applied.append({"kind": a.kind.value, "command": applied["command"],
                                          "arguments": applied["arguments"], "at_s": round(applied["at"] - t_mig, 3)})
                if a.kind is ActionKind.ABORT:
                    aborted = True
                if a.kind is ActionKind.POSTCOPY and live_postcopy and not released:
                    r.measured["target_cont_at_s"] = round(await resume_incoming_target(dst.qmp) - t_mig, 3)
                    released = True
            if aborted:
                break
            if s.finished:
                final = s
                break
            last = s
            await asyncio.sleep(policy.sample_interval_s)
    finally:
        r.decisions = state.decision_log()
    if final is not None and final.status == "completed":
        await _finish_completed(r, src, dst, t_mig, final, rate, size, workdir, released)
        r.total_s = round(r.pre_s + (r.migration_s or 0), 3)
        r.completed_in_limit = r.total_s <= limit_s
        return r
    if aborted:
        rb = await cancel_and_resume(src.qmp)
        r.source_runstate_after = rb["runstate"]
        if rb["status"] == "completed":
            fin = await sample(src.qmp)
            await _finish_completed(r, src, dst, t_mig, fin, rate, size, workdir, released)
            r.total_s = round(r.pre_s + (r.migration_s or 0), 3)
            return r
        r.outcome = "aborted"
        r.error = state.final_reason or next((d["reason"] for d in reversed(r.decisions) if d["kind"] == "abort"), "")
    else:
        r.outcome = "failed"
        r.error = f"QEMU: {final.status}: {final.error}" if final else "monitor loop ended"
    r.total_s = round(time.time() - t_arm, 2)
    r.bytes_sent = last.transferred if last else None
    r.dirty_sync_count = last.dirty_sync_count if last else None
    await _finish_cancelled(r, src, rate, size)
    return r


def observed_first_pass_bandwidth(r: RunResult) -> float | None:
    """Wire bytes/s over the first pass (the first sample after dirty-sync 2), from the samples."""
    for t, status, _rem, transferred, sync, _dr, _mbps in r.samples:
        if sync >= 2 and t > 0.3 and status == "active":
            return transferred / t
    return None


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return round(statistics.median(xs), 2) if xs else None

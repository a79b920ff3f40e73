"""Effects of the convergence engine: set both QEMUs up before `migrate`, and apply
the monitor loop's actions to the source.

The decisions are pure (`ferry.controller.convergence`); they reach this module
as plain dicts, the form they travel in from controller to agent:

    setup  = policy.qemu_setup(link_cap_bytes_s)   # {"source": {...}, "target": {...}}
    action = action.to_dict()                        # {"kind": ..., "params": {...}, "reason": ...}

Every action maps to exactly one QMP command (`action_command`, pure).

QEMU 7.2 constraints this module encodes:
- capabilities can only change while no migration runs, so everything a policy
  might use later (post-copy, auto-converge) is enabled before `migrate`; the
  target needs `postcopy-ram` too, and `postcopy-blocktime` so that its
  `query-migrate` reports how long vCPUs waited for pages;
- auto-converge starts throttling on its own; ferry sets it up dormant (1 %,
  capped at 1 % by max-cpu-throttle) and a throttle action lifts the cap and the
  increment together, which takes effect at QEMU's next throttle check (after
  two dirty-sync iterations with a high dirty rate);
- post-copy cannot be cancelled once the target runs; `migrate_cancel` is only
  sent for pre-copy.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from ferry.qemu.migration import capabilities_arg
from ferry.qemu.session import QmpSession

ACTIVE_PRECOPY = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling"})


class ConvergenceError(RuntimeError):
    pass


# ---- before migrate ------------------------------------------------------------------------

def _setup_dict(setup: Any) -> Mapping:
    if hasattr(setup, "qemu_setup"):
        setup = setup.qemu_setup()
    if not isinstance(setup, Mapping) or "source" not in setup or "target" not in setup:
        raise ConvergenceError("a convergence set-up needs 'source' and 'target' sections")
    return setup


async def _apply_end(qmp: QmpSession, end: Mapping) -> None:
    caps = dict(end.get("capabilities") or {})
    if caps:
        await qmp.execute("migrate-set-capabilities", {"capabilities": capabilities_arg(caps)})
    params = dict(end.get("parameters") or {})
    if params:
        await qmp.execute("migrate-set-parameters", params)


async def prepare_source(qmp_source: QmpSession, setup: Any) -> None:
    """Capabilities and parameters of the source; before `migrate`."""
    await _apply_end(qmp_source, _setup_dict(setup)["source"])


async def prepare_target(qmp_target: QmpSession, setup: Any) -> None:
    """Capabilities and parameters of the target; before `migrate-incoming`."""
    await _apply_end(qmp_target, _setup_dict(setup)["target"])


async def prepare(qmp_source: QmpSession, qmp_target: QmpSession, setup: Any) -> None:
    """Both ends (target first: it must be ready before the source connects).

    `setup` is `ConvergencePolicy.qemu_setup(...)`'s dict, or a policy itself."""
    setup = _setup_dict(setup)
    await prepare_target(qmp_target, setup)
    await prepare_source(qmp_source, setup)


# ---- actions -------------------------------------------------------------------------------

def _kind_params(action: Any) -> tuple[str, dict]:
    if isinstance(action, Mapping):
        kind, params = action.get("kind"), action.get("params") or {}
    else:
        kind, params = getattr(action, "kind", None), getattr(action, "params", None) or {}
    kind = getattr(kind, "value", kind)
    if not isinstance(kind, str):
        raise ConvergenceError(f"not a convergence action: {action!r}")
    return kind, dict(params)


def action_command(action: Any) -> tuple[str, dict | None]:
    """The one QMP command (name, arguments) that carries out an action."""
    kind, p = _kind_params(action)
    if kind == "set-downtime":
        return "migrate-set-parameters", {"downtime-limit": int(p["downtime_limit_ms"])}
    if kind == "set-bandwidth":
        return "migrate-set-parameters", {"max-bandwidth": int(p["bytes_per_s"])}
    if kind == "throttle":
        pct = int(p["percent"])
        if not 1 <= pct <= 99:
            raise ConvergenceError(f"throttle percent must be 1-99, got {pct}")
        # QEMU raises the throttle to min(current + increment, max-cpu-throttle): from the
        # dormant 1 % this jumps straight to `pct` at its next check.
        return "migrate-set-parameters", {"max-cpu-throttle": pct, "cpu-throttle-increment": pct}
    if kind == "postcopy":
        return "migrate-start-postcopy", None
    if kind == "abort":
        return "migrate_cancel", None
    raise ConvergenceError(f"unknown convergence action {kind!r}")


async def apply_action(qmp_source: QmpSession, action: Any) -> dict:
    """Send an action's QMP command to the source QEMU; returns what was sent and when."""
    command, arguments = action_command(action)
    at = time.time()
    reply = await qmp_source.execute(command, arguments)
    return {"command": command, "arguments": arguments, "at": at, "reply": reply}


# ---- around the switchover -----------------------------------------------------------------

async def resume_incoming_target(qmp_target: QmpSession) -> float:
    """`cont` a target that was started with -S; returns the wall-clock time it was sent.

    Needed for post-copy in verification mode: a paused target would make post-copy
    pointless (pages would only arrive by background push while the guest is
    stopped). Sent while the target is still receiving (`inmigrate`), `cont` only
    sets QEMU's autostart, so the vCPUs start the moment the device state is loaded,
    exactly as on a target started without -S: send it together with
    `migrate-start-postcopy`. Caution: `cont` also activates block devices; only do
    this when the target's disks are not shared with the still-running source
    (ferry's guests have none), and only when post-copy is about to start (if
    pre-copy completes instead, the target starts by itself and its memory can no
    longer be compared with the source)."""
    sent_at = time.time()
    await qmp_target.execute("cont")
    return sent_at


async def wait_migration_status(qmp: QmpSession, status: str, since: float, timeout_s: float):
    """The first MIGRATION event with `status` at or after `since` (QEMU time), waiting for it."""
    deadline = time.monotonic() + timeout_s
    after = since
    while True:
        for e in qmp.events:
            if e.name == "MIGRATION" and e.at >= since and e.data.get("status") == status:
                return e
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError(f"no MIGRATION {status} event within {timeout_s:.0f} s")
        try:
            ev = await qmp.wait_for_event("MIGRATION", after=after, timeout_s=min(remaining, 0.5))
            after = ev.at + 1e-7
        except asyncio.TimeoutError:
            pass


async def postcopy_blocktime(qmp_target: QmpSession) -> dict:
    """How long the target's vCPUs waited for post-copy pages (needs the target capability
    `postcopy-blocktime`): {"postcopy_blocktime_ms": total, "vcpu_blocktime_ms": [...]}."""
    reply = await qmp_target.execute("query-migrate")
    return {"postcopy_blocktime_ms": reply.get("postcopy-blocktime"),
            "vcpu_blocktime_ms": reply.get("postcopy-vcpu-blocktime"),
            "target_status": reply.get("status")}


async def cancel_and_resume(qmp_source: QmpSession, timeout_s: float = 15.0) -> dict:
    """Roll the source back: `migrate_cancel` (pre-copy only), wait for QEMU to settle, and
    make sure the guest runs. Returns {"status": final migration status, "runstate": ...}.

    If the migration completed before the cancel took effect, the source is left paused
    (the target owns the VM now) and status is "completed"."""
    status = (await qmp_source.execute("query-migrate")).get("status", "none")
    if status.startswith("postcopy"):
        raise ConvergenceError("post-copy is running: the migration cannot be cancelled")
    if status in ACTIVE_PRECOPY:
        await qmp_source.execute("migrate_cancel")
    deadline = time.monotonic() + timeout_s
    while status in ACTIVE_PRECOPY:
        if time.monotonic() > deadline:
            raise ConvergenceError(f"migration still {status} {timeout_s:.0f} s after migrate_cancel")
        await asyncio.sleep(0.05)
        status = (await qmp_source.execute("query-migrate")).get("status", "none")
    runstate = (await qmp_source.execute("query-status"))["status"]
    if status != "completed" and runstate != "running":
        await qmp_source.execute("cont")
        runstate = (await qmp_source.execute("query-status"))["status"]
    return {"status": status, "runstate": runstate}

"""The maintenance reconciler: from events to emptied, repaired hosts back in service.

Each tick it refreshes what the agents report, takes in new events (manifest
changes, hardware signals; operators call `schedule` directly), asks the
planner what may start now, and carries that out: drains (with guest notice),
migrations after the notice period, the maintenance action on empty hosts,
and the return to service. Decisions are the planner's pure functions; this
module only performs them and records every step on the event.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

from watchfiles import awatch

from ferry.controller.agent_client import AgentError
from ferry.controller.config import ControllerConfig
from ferry.controller.manifest import Manifest, ManifestError, outdated_hosts, parse_manifest, up_to_date
from ferry.controller.planner import FleetView, plan_drains, plan_migrations
from ferry.controller.service import Controller
from ferry.model import (Conflict, EventSource, EventState, HostProgress, HostState, InstanceState,
                         MaintenanceEvent, NotFound, Phase, Urgency)

log = logging.getLogger(__name__)

NOTICE = {"migrate": "MIGRATE_ON_HOST_MAINTENANCE", "terminate": "TERMINATE_ON_HOST_MAINTENANCE"}


class MaintenanceEngine:
    def __init__(self, controller: Controller, config: ControllerConfig, clock=time.time):
        self.ctl = controller
        self.store = controller.store
        self.config = config
        self.clock = clock
        self.manifest: Manifest | None = None
        self.manifest_error: str | None = None
        self.manifest_loaded_at: float | None = None
        self._manifest_seen: tuple[str, frozenset] | None = None
        self.attempts: dict[str, tuple[int, float]] = {}     # vm -> (failed tries, when)
        self._counted: set[str] = set()                      # migration ids already counted as failures
        self._wake = asyncio.Event()
        self._actions: dict[str, asyncio.Task] = {}          # host -> running maintenance action
        self._tasks: list[asyncio.Task] = []

    # ---- life --------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._loop(), name="maintenance-reconciler"))
        if self.config.manifest is not None:
            self._tasks.append(asyncio.create_task(self._watch_manifest(), name="manifest-watcher"))

    async def stop(self) -> None:
        for t in self._tasks + list(self._actions.values()):
            t.cancel()

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the reconciler must outlive any one bad tick
                log.exception("maintenance tick failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.tick_s)
            except asyncio.TimeoutError:
                pass

    async def _watch_manifest(self) -> None:
        path = self.config.manifest
        path.parent.mkdir(parents=True, exist_ok=True)
        # Watch the folder: editors replace files rather than write them in place.
        async for changes in awatch(path.parent, debounce=200, step=50):
            if any(Path(p).name == path.name for _, p in changes):
                log.info("manifest %s changed on disk", path)
                self.wake()

    # ---- one pass ----------------------------------------------------------------------------
    async def tick(self) -> None:
        await self.refresh_inventory()
        self.load_manifest()
        self.intake_manifest()
        self.intake_hardware()
        await self.advance()

    async def refresh_inventory(self) -> None:
        hosts = self.store.list_hosts()

        async def one(host):
            try:
                return host.name, await self.ctl.agent_for(host.name).inventory()
            except AgentError as exc:
                return host.name, exc
        for name, inv in await asyncio.gather(*(one(h) for h in hosts)):
            host = self.store.get_host(name)
            if host is None:
                continue
            if isinstance(inv, Exception):
                host.inventory = {**host.inventory, "unreachable": str(inv)}
            else:
                host.inventory = inv
            self.store.put_host(host)

    # ---- intake ------------------------------------------------------------------------------
    def load_manifest(self) -> None:
        path = self.config.manifest
        if path is None:
            return
        try:
            text = path.read_text()
        except OSError as exc:
            text = f"<unreadable: {exc}>"
        groups = frozenset(h.labels.get("group") for h in self.store.list_hosts() if h.labels.get("group"))
        if self._manifest_seen == (text, groups):
            return
        self._manifest_seen = (text, groups)
        try:
            if text.startswith("<unreadable"):
                raise ManifestError(f"manifest {path} {text[1:-1]}")
            self.manifest = parse_manifest(text, set(groups))
            self.manifest_error = None
            self.manifest_loaded_at = self.clock()
            log.info("manifest %s loaded: %s", path, self.manifest.groups)
        except ManifestError as exc:
            self.manifest_error = str(exc)
            log.error("manifest %s rejected, the last valid one stays in force: %s", path, exc)

    def _open_events(self) -> list[MaintenanceEvent]:
        return [e for e in self.store.list_events() if e.open]

    def _hosts_with_open_work(self) -> set[str]:
        return {h for e in self._open_events() for h, p in e.progress.items()
                if p in (HostProgress.WAITING, HostProgress.DRAINING, HostProgress.MAINTENANCE)}

    def intake_manifest(self) -> None:
        if self.manifest is None:
            return
        busy = self._hosts_with_open_work()
        outdated = {h: v for h, v in outdated_hosts(self.manifest, self.store.list_hosts()).items() if h not in busy}
        if not outdated:
            return
        changes = "; ".join(f"{h}: " + ", ".join(f"{k} -> {v}" for k, v in d.items()) for h, d in sorted(outdated.items()))
        self.new_event(EventSource.MANIFEST, sorted(outdated), f"manifest rollout ({changes})",
                       Urgency.PLANNED, desired=outdated)

    def intake_hardware(self) -> None:
        policy = self.config.health
        open_hw = {h for e in self._open_events() if e.source is EventSource.HARDWARE for h in e.hosts}
        for host in self.store.list_hosts():
            health = (host.inventory or {}).get("health") or {}
            reasons = []
            if health.get("ecc_corrected", 0) >= policy.ecc_threshold:
                reasons.append(f"{health['ecc_corrected']} corrected memory errors (threshold {policy.ecc_threshold})")
            if health.get("disk") in policy.failing_disk_states:
                reasons.append(f"disk health {health['disk']}")
            if reasons and host.name not in open_hw and host.state is not HostState.MAINTENANCE:
                self.new_event(EventSource.HARDWARE, [host.name], "impending hardware failure: " + "; ".join(reasons),
                               Urgency.URGENT)

    def new_event(self, source: EventSource, hosts: list[str], reason: str, urgency: Urgency,
                  not_before: float = 0.0, action: str = "maintain",
                  desired: dict[str, dict[str, str]] | None = None,
                  migration_policy: str | None = None) -> MaintenanceEvent:
        for name in hosts:
            self.ctl.host(name)      # unknown host: a clear error, nothing recorded
        if not hosts:
            raise Conflict("a maintenance event needs at least one host")
        now = self.clock()
        event = MaintenanceEvent(id=uuid.uuid4().hex[:10], source=source, hosts=list(hosts), reason=reason,
                                 urgency=urgency, created_at=now, not_before=not_before, action=action,
                                 desired_versions=desired or {}, migration_policy=migration_policy,
                                 progress={h: HostProgress.WAITING.value for h in hosts})
        event.note(now, f"created ({source.value}, {urgency.value}): {reason}")
        self.store.put_event(event)
        log.info("maintenance event %s: %s %s", event.id, hosts, reason)
        self.wake()
        return event

    # ---- operator actions --------------------------------------------------------------------
    def check_drainable(self, host_name: str) -> None:
        """Refuse at once a drain that could not place every VM (nothing is recorded)."""
        from ferry.controller.planner import evacuation_problem
        host = self.ctl.host(host_name)
        if host.state is not HostState.ACTIVE:
            raise Conflict(f"host {host_name} is already {host.state.value}")
        view = self.view()
        leaving = {h.name for h in view.hosts if h.state is not HostState.ACTIVE} | {host_name}
        problem = evacuation_problem(host, view, leaving, self.config.planner)
        if problem:
            raise Conflict(f"cannot drain {host_name}: {problem}")

    def event(self, event_id: str) -> MaintenanceEvent:
        e = self.store.get_event(event_id)
        if e is None:
            raise NotFound(f"unknown maintenance event {event_id!r}")
        return e

    async def cancel(self, event_id: str) -> MaintenanceEvent:
        """Migrations not yet started are dropped, running ones finish; hosts return to active."""
        e = self.event(event_id)
        if not e.open:
            raise Conflict(f"maintenance event {event_id} is already {e.state.value}")
        now = self.clock()
        for name, progress in list(e.progress.items()):
            if progress in (HostProgress.WAITING, HostProgress.DRAINING):
                e.progress[name] = HostProgress.CANCELLED.value
                if progress == HostProgress.DRAINING:
                    await self._return_to_service(name, withdraw_notices=True)
        e.state, e.finished_at = EventState.CANCELLED, now
        e.note(now, "cancelled by operator")
        self.store.put_event(e)
        return e

    async def undrain(self, host_name: str) -> None:
        host = self.ctl.host(host_name)
        for e in self._open_events():
            if host_name in e.hosts and e.progress.get(host_name) in (HostProgress.WAITING, HostProgress.DRAINING):
                e.progress[host_name] = HostProgress.CANCELLED.value
                e.note(self.clock(), f"{host_name} undrained by operator")
                self._maybe_finish(e)
                self.store.put_event(e)
        if host.state in (HostState.DRAINING, HostState.MAINTENANCE):
            await self._return_to_service(host_name, withdraw_notices=True)

    # ---- carrying out the plan -----------------------------------------------------------------
    def view(self) -> FleetView:
        return FleetView(self.store.list_hosts(), self.store.list_instances(), self.store.list_migrations(),
                         self._open_events())

    async def advance(self) -> None:
        now = self.clock()
        self._count_failures()
        drains = plan_drains(self.view(), self.config.planner, now)
        for d in drains.drains:
            await self._start_drain(d.event_id, d.host)
        await self._terminate_noticed(now)
        hosts = self.store.list_hosts()
        fresh = {h.name: up_to_date(self.manifest, h) for h in hosts}
        moves = plan_migrations(self.view(), self.config.planner, now, fresh, self.attempts)
        for mv in moves.migrations:
            event = self.store.get_event(mv.event_id)
            try:
                m = await self.ctl.start_migration(mv.vm, mv.target, reason=f"maintenance {mv.event_id}",
                                                   notified_at=event.notices.get(mv.vm),
                                                   policy=event.migration_policy)
                event.note(now, f"migrating {mv.vm} {mv.source} -> {mv.target} (migration {m.id})")
            except Exception as exc:  # noqa: BLE001 - recorded; the planner retries after a pause
                self.attempts[mv.vm] = (self.attempts.get(mv.vm, (0, 0))[0] + 1, now)
                event.note(now, f"could not start migrating {mv.vm}: {exc}")
            self.store.put_event(event)
        for event_id, reason in {**drains.blocked, **moves.blocked}.items():
            event = self.store.get_event(event_id)
            if event.blocked != reason:
                event.blocked = reason
                event.note(now, f"waiting: {reason}")
                self.store.put_event(event)
        await self._finish_empty_hosts()
        for e in self._open_events():
            if self._maybe_finish(e):
                self.store.put_event(e)

    def _count_failures(self) -> None:
        for m in self.store.list_migrations():
            if m.phase in (Phase.ABORTED, Phase.FAILED) and m.reason.startswith("maintenance ") and m.id not in self._counted:
                self._counted.add(m.id)
                tries = self.attempts.get(m.vm, (0, 0.0))[0] + 1
                self.attempts[m.vm] = (tries, m.finished_at or self.clock())

    async def _start_drain(self, event_id: str, host_name: str) -> None:
        now = self.clock()
        event = self.store.get_event(event_id)
        host = self.ctl.host(host_name)
        host.state = HostState.DRAINING
        self.store.put_host(host)
        event.progress[host_name] = HostProgress.DRAINING.value
        if event.state is EventState.PENDING:
            event.state, event.started_at = EventState.RUNNING, now
        event.blocked = None
        event.note(now, f"draining {host_name}")
        window = {"type": "SCHEDULED", "maintenance_status": "ONGOING",
                  "window_start_time": _iso(now), "window_end_time": _iso(now + self.config.planner.notice_period_s + 600),
                  "latest_window_start_time": _iso(now + self.config.planner.notice_period_s),
                  "can_reschedule": False}
        for inst in self.store.list_instances():
            if inst.host != host_name or inst.state is not InstanceState.RUNNING:
                continue
            value = NOTICE[inst.spec.on_host_maintenance]
            try:
                await self.ctl.agent_for(host_name).set_maintenance_event(inst.name, value, window)
                event.notices[inst.name] = self.clock()
                event.note(event.notices[inst.name], f"guest {inst.name} told {value}")
            except AgentError as exc:
                event.note(now, f"could not notify {inst.name}: {exc}")
        self.store.put_event(event)

    async def _terminate_noticed(self, now: float) -> None:
        period = self.config.planner.notice_period_s
        for e in self._open_events():
            for inst in self.store.list_instances():
                if (e.progress.get(inst.host) == HostProgress.DRAINING and inst.spec.on_host_maintenance == "terminate"
                        and inst.state is InstanceState.RUNNING and inst.name in e.notices
                        and now >= e.notices[inst.name] + period):
                    reply = await self.ctl.agent_for(inst.host).shutdown_vm(inst.name)
                    inst.state = InstanceState.STOPPED
                    self.store.put_instance(inst)
                    e.note(self.clock(), f"{inst.name} shut down for maintenance ({'clean' if reply.get('clean') else 'forced'})")
                    self.store.put_event(e)

    async def _finish_empty_hosts(self) -> None:
        active = [m for m in self.store.list_migrations() if not m.done]
        for e in self._open_events():
            for name, progress in e.progress.items():
                if progress != HostProgress.DRAINING or name in self._actions:
                    continue
                busy = [i.name for i in self.store.list_instances()
                        if i.host == name and i.state is not InstanceState.STOPPED]
                if busy or any(m.source == name or m.target == name for m in active):
                    continue
                host = self.ctl.host(name)
                host.state = HostState.MAINTENANCE
                self.store.put_host(host)
                e.progress[name] = HostProgress.MAINTENANCE.value
                e.note(self.clock(), f"{name} is empty: in maintenance")
                self.store.put_event(e)
                task = asyncio.create_task(self._maintain(e.id, name), name=f"maintain-{name}")
                self._actions[name] = task
                task.add_done_callback(lambda _t, n=name: self._actions.pop(n, None))

    async def _maintain(self, event_id: str, host_name: str) -> None:
        event = self.store.get_event(event_id)
        try:
            if event.action == "maintain":
                host = self.ctl.host(host_name)
                desired = (self.manifest.desired_for(host) if self.manifest else None) or \
                    event.desired_versions.get(host_name, {})
                reply = await self.ctl.agent_for(host_name).apply_maintenance(desired)
                event = self.store.get_event(event_id)
                event.note(self.clock(), f"{host_name} maintained: now runs {reply.get('versions')}")
                self.store.put_event(event)
                await self.refresh_inventory()
                await self._return_to_service(host_name, withdraw_notices=False)
                event = self.store.get_event(event_id)
                event.note(self.clock(), f"{host_name} back in service")
            else:
                event = self.store.get_event(event_id)
                event.note(self.clock(), f"{host_name} drained; it stays in maintenance until `ferry host undrain`")
            event.progress[host_name] = HostProgress.DONE.value
            self._satisfy_others(event_id, host_name)
        except Exception as exc:  # noqa: BLE001
            event = self.store.get_event(event_id)
            event.note(self.clock(), f"maintenance action on {host_name} failed: {exc}")
            event.state = EventState.FAILED
            log.exception("maintenance of %s failed", host_name)
        self._maybe_finish(event)
        self.store.put_event(event)
        self.wake()

    def _satisfy_others(self, event_id: str, host_name: str) -> None:
        """A maintained host also settles other events waiting for it (e.g. a rollout and a repair)."""
        host = self.ctl.host(host_name)
        for e in self._open_events():
            if e.id != event_id and e.progress.get(host_name) == HostProgress.WAITING.value and e.action == "maintain":
                if e.source is not EventSource.MANIFEST or up_to_date(self.manifest, host):
                    e.progress[host_name] = HostProgress.DONE.value
                    e.note(self.clock(), f"{host_name} settled by maintenance event {event_id}")
                    self._maybe_finish(e)
                    self.store.put_event(e)

    async def _return_to_service(self, host_name: str, withdraw_notices: bool) -> None:
        host = self.ctl.host(host_name)
        host.state = HostState.ACTIVE
        self.store.put_host(host)
        for inst in self.store.list_instances():
            if inst.host != host_name:
                continue
            if inst.state is InstanceState.STOPPED and inst.spec.on_host_maintenance == "terminate":
                await self.ctl.restart_vm(inst.name)      # GCE's automatic restart after maintenance
            elif withdraw_notices and inst.state is InstanceState.RUNNING:
                try:
                    await self.ctl.agent_for(host_name).set_maintenance_event(inst.name, "NONE", None)
                except AgentError:
                    pass

    def _maybe_finish(self, e: MaintenanceEvent) -> bool:
        if e.open and all(p in (HostProgress.DONE, HostProgress.CANCELLED) for p in e.progress.values()):
            e.state = EventState.COMPLETED if any(p == HostProgress.DONE for p in e.progress.values()) \
                else EventState.CANCELLED
            e.finished_at = self.clock()
            e.note(e.finished_at, f"{e.state.value}")
            return True
        return False

    def status(self) -> dict:
        return {"path": str(self.config.manifest) if self.config.manifest else None,
                "valid": self.manifest_error is None, "error": self.manifest_error,
                "in_force": self.manifest.groups if self.manifest else None,
                "loaded_at": self.manifest_loaded_at}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

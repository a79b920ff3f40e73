"""The planner: which hosts start draining, and which VMs move where, now. Pure.

Inputs are plain data (hosts, instances, migrations in flight, open events);
outputs are decisions with reasons. The reconciler carries them out.

Policies (all in `PlannerPolicy`): at most N hosts draining per rack, per zone
and fleet-wide; a memory reserve that must remain free on the hosts that stay
in service; urgent (hardware) events before planned ones; at most N
concurrent migrations per source, per target and fleet-wide; and during a
rollout, targets that are not themselves waiting for maintenance come first,
so each VM moves at most once per rollout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ferry.controller.scheduler import memory_in_use
from ferry.model import (Host, HostProgress, HostState, Instance, InstanceState, MaintenanceEvent, Migration,
                         Urgency)


@dataclass(frozen=True)
class PlannerPolicy:
    max_draining_per_rack: int = 1
    max_draining_per_zone: int = 2
    max_draining_fleet: int = 2
    spare_memory_mib: int = 0            # must stay free across in-service hosts after a drain is placed
    max_migrations_per_source: int = 1
    max_migrations_per_target: int = 1
    max_migrations_fleet: int = 2
    notice_period_s: float = 60.0        # GCE gives guests 60 s
    retry_after_s: float = 5.0           # after a failed migration
    max_attempts: int = 3


@dataclass
class FleetView:
    hosts: list[Host]
    instances: list[Instance]
    migrations: list[Migration]          # all; finished ones are ignored where it matters
    events: list[MaintenanceEvent]       # open ones

    def host(self, name: str) -> Host | None:
        return next((h for h in self.hosts if h.name == name), None)

    @property
    def active_migrations(self) -> list[Migration]:
        return [m for m in self.migrations if not m.done]


@dataclass(frozen=True)
class StartDrain:
    event_id: str
    host: str


@dataclass(frozen=True)
class StartMigration:
    event_id: str
    vm: str
    source: str
    target: str


@dataclass
class Plan:
    drains: list[StartDrain] = field(default_factory=list)
    migrations: list[StartMigration] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)   # event id -> why it cannot proceed


def event_order(events: list[MaintenanceEvent]) -> list[MaintenanceEvent]:
    """Urgent before planned; older first."""
    return sorted(events, key=lambda e: (e.urgency is not Urgency.URGENT, e.created_at, e.id))


def out_of_service(host: Host) -> bool:
    return host.state is not HostState.ACTIVE


def movable(inst: Instance) -> bool:
    return inst.state in (InstanceState.RUNNING, InstanceState.MIGRATING) and inst.spec.on_host_maintenance == "migrate"


def hosts_awaiting_maintenance(events: list[MaintenanceEvent]) -> set[str]:
    return {h for e in events for h, p in e.progress.items() if p in (HostProgress.WAITING, HostProgress.DRAINING)}


def evacuation_problem(host: Host, view: FleetView, leaving: set[str], policy: PlannerPolicy) -> str | None:
    """Why the VMs of `host` could not all be placed elsewhere (None: they can). First-fit decreasing."""
    used = memory_in_use(view.hosts, view.instances, view.active_migrations)
    targets = [h for h in view.hosts if h.name not in leaving and h.name != host.name and not out_of_service(h)]
    free = {h.name: h.memory_mib - used.get(h.name, 0) for h in targets}
    vms = sorted((i for i in view.instances if i.host == host.name and movable(i)),
                 key=lambda i: -i.spec.memory_mib)
    for inst in vms:
        fits = [t for t in targets if free[t.name] >= inst.spec.memory_mib and t.vcpus >= inst.spec.vcpus]
        if not fits:
            room = ", ".join(f"{t.name} {free[t.name]} MiB" for t in targets) or "no host in service"
            return f"no room for VM {inst.name} ({inst.spec.memory_mib} MiB) off {host.name}: free: {room}"
        best = max(fits, key=lambda t: free[t.name])
        free[best.name] -= inst.spec.memory_mib
    if policy.spare_memory_mib and sum(free.values()) < policy.spare_memory_mib:
        return (f"draining {host.name} would leave {sum(free.values())} MiB free in service,"
                f" below the reserve of {policy.spare_memory_mib} MiB")
    return None


def plan_drains(view: FleetView, policy: PlannerPolicy, now: float) -> Plan:
    plan = Plan()
    draining = {h.name for h in view.hosts if h.state in (HostState.DRAINING, HostState.MAINTENANCE)}

    def count(label: str, value: str | None) -> int:
        return sum(1 for h in view.hosts if h.name in draining and h.labels.get(label) == value)

    for event in event_order(view.events):
        if now < event.not_before:
            continue
        for name in event.hosts:
            if event.progress.get(name) != HostProgress.WAITING:
                continue
            host = view.host(name)
            if host is None or name in draining:
                continue     # drained by another event first; this one waits its turn
            if len(draining) >= policy.max_draining_fleet:
                plan.blocked.setdefault(event.id, f"fleet-wide limit: {len(draining)} host(s) already draining")
                continue
            rack, zone = host.labels.get("rack"), host.labels.get("zone")
            if rack is not None and count("rack", rack) >= policy.max_draining_per_rack:
                plan.blocked.setdefault(event.id, f"rack {rack} already has a host draining")
                continue
            if zone is not None and count("zone", zone) >= policy.max_draining_per_zone:
                plan.blocked.setdefault(event.id, f"zone {zone} already has {policy.max_draining_per_zone} draining")
                continue
            problem = evacuation_problem(host, view, draining | {name}, policy)
            if problem:
                plan.blocked[event.id] = f"cannot drain {name}: {problem}"
                continue
            plan.drains.append(StartDrain(event.id, name))
            draining.add(name)
    return plan


def plan_migrations(view: FleetView, policy: PlannerPolicy, now: float,
                    up_to_date: dict[str, bool], attempts: dict[str, tuple[int, float]]) -> Plan:
    """Moves for VMs on draining hosts whose notice period has passed, within the concurrency limits.

    `up_to_date`: host -> whether it already runs the manifest's versions (preferred targets);
    `attempts`: vm -> (failed attempts, when the last one failed).
    """
    plan = Plan()
    active = view.active_migrations
    per_source: dict[str, int] = {}
    per_target: dict[str, int] = {}
    for m in active:
        per_source[m.source] = per_source.get(m.source, 0) + 1
        per_target[m.target] = per_target.get(m.target, 0) + 1
    fleet = len(active)
    used = memory_in_use(view.hosts, view.instances, active)
    awaiting = hosts_awaiting_maintenance(view.events)
    migrating = {m.vm for m in active}
    by_host_event = {h: e for e in event_order(view.events) for h, p in e.progress.items() if p == HostProgress.DRAINING}
    for host_name, event in by_host_event.items():
        for inst in sorted((i for i in view.instances if i.host == host_name), key=lambda i: i.name):
            if inst.name in migrating or inst.state is not InstanceState.RUNNING or not movable(inst):
                continue
            noticed = event.notices.get(inst.name)
            if noticed is None or now < noticed + policy.notice_period_s:
                continue
            tries, last = attempts.get(inst.name, (0, 0.0))
            if tries >= policy.max_attempts:
                plan.blocked[event.id] = f"VM {inst.name} failed to migrate {tries} times; the drain of {host_name} is stuck"
                continue
            if tries and now < last + policy.retry_after_s:
                continue
            if fleet >= policy.max_migrations_fleet or per_source.get(host_name, 0) >= policy.max_migrations_per_source:
                continue
            target = pick_target(inst, view, used, per_target, policy, awaiting, up_to_date)
            if target is None:
                plan.blocked[event.id] = f"no target for VM {inst.name} right now (capacity or per-target limits)"
                continue
            plan.migrations.append(StartMigration(event.id, inst.name, host_name, target.name))
            fleet += 1
            per_source[host_name] = per_source.get(host_name, 0) + 1
            per_target[target.name] = per_target.get(target.name, 0) + 1
            used[target.name] = used.get(target.name, 0) + inst.spec.memory_mib
    return plan


def pick_target(inst: Instance, view: FleetView, used: dict[str, int], per_target: dict[str, int],
                policy: PlannerPolicy, awaiting: set[str], up_to_date: dict[str, bool]) -> Host | None:
    fits = [h for h in view.hosts
            if h.name != inst.host and not out_of_service(h)
            and h.memory_mib - used.get(h.name, 0) >= inst.spec.memory_mib and h.vcpus >= inst.spec.vcpus]
    # A host that will not itself be drained in this rollout keeps the VM from moving twice:
    # if one has room, wait for it rather than take a host that is waiting for maintenance.
    settled = [h for h in fits if h.name not in awaiting]
    pool = settled or fits
    candidates = [h for h in pool if per_target.get(h.name, 0) < policy.max_migrations_per_target]
    if not candidates:
        return None
    return max(candidates, key=lambda h: (up_to_date.get(h.name, True), h.memory_mib - used.get(h.name, 0),
                                          [-ord(c) for c in h.name]))

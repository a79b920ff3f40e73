"""The controller's operations, shared by its API: hosts, VMs, migrations.

Every decision that takes capacity (a new VM, a migration's reservation on its
target) is made under one lock and recorded in the store before any effect,
so two requests can never both take the last free memory of a host.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from typing import Callable

from ferry.controller import convergence as conv
from ferry.controller.agent_client import AgentClient, AgentError, AgentPool
from ferry.controller.migrator import Migrator
from ferry.controller.policy import MigrationPolicy
from ferry.controller.scheduler import check_fits, choose_host, memory_in_use
from ferry.model import (Conflict, Host, HostState, Instance, InstanceSpec, InstanceState, InvalidInput,
                         Migration, NotFound, Phase, parse_workload, validate_name)
from ferry.model.instance import validate_spec
from ferry.net.addressing import allocate_vm_ip, vm_mac
from ferry.store import Store

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, store: Store, policy: MigrationPolicy | None = None, tls: ssl.SSLContext | None = None,
                 source_dn: Callable[[str], str] | None = None):
        self.store = store
        self.agents = AgentPool(tls)
        self.migrator = Migrator(store, self.agent_for, policy or MigrationPolicy(), source_dn=source_dn)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    # ---- hosts -----------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        host = self.store.get_host(name)
        if host is None:
            known = ", ".join(h.name for h in self.store.list_hosts()) or "none"
            raise NotFound(f"unknown host {name!r} (known: {known})")
        return host

    def agent_for(self, host_name: str) -> AgentClient:
        host = self.host(host_name)
        return self.agents.get(host.name, host.agent_url)

    async def add_host(self, name: str, agent_url: str, labels: dict[str, str] | None = None) -> Host:
        validate_name(name, "host name")
        if self.store.get_host(name):
            raise Conflict(f"host {name!r} is already registered")
        inv = await self.agents.get(name, agent_url).inventory()
        if inv["name"] != name:
            raise InvalidInput(f"the agent at {agent_url} is host {inv['name']!r}, not {name!r}")
        host = Host(name=name, agent_url=agent_url, underlay_ip=inv["underlay_ip"], memory_mib=inv["memory_mib"],
                    vcpus=inv["vcpus"], labels={**inv.get("labels", {}), **(labels or {})}, inventory=inv)
        self.store.put_host(host)
        return host

    async def host_detail(self, name: str) -> dict:
        host = self.host(name)
        used = self._usage()
        detail = host.to_dict() | {"used_memory_mib": used.get(name, 0),
                                   "free_memory_mib": host.memory_mib - used.get(name, 0)}
        try:
            detail["inventory"] = await self.agent_for(name).inventory()
            detail["reachable"] = True
        except AgentError as exc:
            detail["reachable"], detail["agent_error"] = False, str(exc)
        return detail

    def _usage(self) -> dict[str, int]:
        return memory_in_use(self.store.list_hosts(), self.store.list_instances(), self.store.list_migrations())

    def host_summaries(self) -> list[dict]:
        used = self._usage()
        counts: dict[str, int] = {}
        for inst in self.store.list_instances():
            counts[inst.host] = counts.get(inst.host, 0) + 1
        return [h.to_dict() | {"used_memory_mib": used.get(h.name, 0),
                               "free_memory_mib": h.memory_mib - used.get(h.name, 0),
                               "vm_count": counts.get(h.name, 0)} for h in self.store.list_hosts()]

    # ---- VMs -------------------------------------------------------------------------------
    def instance(self, name: str) -> Instance:
        inst = self.store.get_instance(name)
        if inst is None:
            raise NotFound(f"unknown VM {name!r}")
        return inst

    async def create_vm(self, name: str, memory_mib: int, vcpus: int, workload: str | None,
                        host: str | None = None, on_host_maintenance: str = "migrate",
                        migration_policy: str | None = None) -> Instance:
        validate_name(name, "VM name")
        spec = InstanceSpec(memory_mib, vcpus, parse_workload(workload), on_host_maintenance, migration_policy)
        validate_spec(spec)
        if migration_policy is not None and migration_policy not in self.migrator.policies:
            raise InvalidInput(f"unknown convergence policy {migration_policy!r} "
                               f"(known: {', '.join(sorted(self.migrator.policies))})")
        async with self._lock:
            if self.store.get_instance(name):
                raise Conflict(f"a VM named {name!r} already exists")
            hosts = self.store.list_hosts()
            used = self._usage()
            if host is not None:
                chosen = self.host(host)
                check_fits(spec, chosen, used, name)
            else:
                chosen = choose_host(spec, hosts, used, name)
            ip = allocate_vm_ip({i.ip for i in self.store.list_instances()})
            inst = Instance(name=name, spec=spec, ip=ip, mac=vm_mac(name), host=chosen.name,
                            state=InstanceState.CREATING, created_at=time.time())
            self.store.put_instance(inst)   # takes the capacity before any effect
        try:
            await self.agent_for(chosen.name).create_vm(
                {"name": name, "ip": ip, "mac": inst.mac, "memory_mib": memory_mib, "vcpus": vcpus,
                 "workload": str(spec.workload)})
        except Exception:
            self.store.delete_instance(name)
            raise
        inst.state = InstanceState.RUNNING
        self.store.put_instance(inst)
        return inst

    async def restart_vm(self, name: str) -> Instance:
        """Boot a stopped VM again on its host (after maintenance, like GCE's automatic restart)."""
        async with self._lock:
            inst = self.instance(name)
            if inst.state is not InstanceState.STOPPED:
                raise Conflict(f"VM {name!r} is {inst.state.value}, not stopped")
            check_fits(inst.spec, self.host(inst.host), self._usage(), name)
            inst.state = InstanceState.CREATING
            self.store.put_instance(inst)
        try:
            await self.agent_for(inst.host).create_vm(
                {"name": name, "ip": inst.ip, "mac": inst.mac, "memory_mib": inst.spec.memory_mib,
                 "vcpus": inst.spec.vcpus, "workload": str(inst.spec.workload)})
            inst.state = InstanceState.RUNNING
        except Exception as exc:  # noqa: BLE001
            inst.state, inst.error = InstanceState.STOPPED, f"restart failed: {exc}"
        self.store.put_instance(inst)
        return inst

    async def delete_vm(self, name: str) -> None:
        async with self._lock:
            inst = self.instance(name)
            if inst.state is InstanceState.MIGRATING:
                raise Conflict(f"VM {name!r} is migrating; wait for its migration to end")
            was_stopped = inst.state is InstanceState.STOPPED
            inst.state = InstanceState.STOPPED
            self.store.put_instance(inst)
        if was_stopped:
            self.store.delete_instance(name)
            return
        try:
            await self.agent_for(inst.host).delete_vm(name)
        except AgentError as exc:
            if "no VM" not in str(exc):
                raise
        self.store.delete_instance(name)

    async def vm_detail(self, name: str) -> dict:
        inst = self.instance(name)
        detail = inst.to_dict()
        detail["migration_ids"] = [m.id for m in self.store.list_migrations(vm=name)]
        if inst.state is InstanceState.STOPPED:
            return detail
        agent = self.agent_for(inst.host)
        try:
            detail["agent"] = await agent.vm_status(name)
            detail["guest"] = await agent.guest_status(name)
        except AgentError as exc:
            detail["agent_error"] = str(exc)
        return detail

    # ---- migrations ------------------------------------------------------------------------
    async def start_migration(self, vm: str, target: str | None, verify_memory: bool = False,
                              reason: str = "operator", notified_at: float | None = None,
                              tls: bool | None = None, policy: str | None = None) -> Migration:
        async with self._lock:
            inst = self.instance(vm)
            if inst.state is not InstanceState.RUNNING:
                raise Conflict(f"VM {vm!r} is {inst.state.value}; only a running VM can be migrated")
            used = self._usage()
            if target is None:
                chosen = choose_host(inst.spec, self.store.list_hosts(), used, vm, exclude=frozenset({inst.host}))
            else:
                chosen = self.host(target)
                if chosen.name == inst.host:
                    raise InvalidInput(f"VM {vm!r} already runs on {target}; choose another target host")
                check_fits(inst.spec, chosen, used, vm)
            try:
                chosen_policy, why = self.migrator.choose_policy(inst.spec.migration_policy, policy)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
            accel = (self.host(inst.host).inventory or {}).get("accel", "tcg")
            unsafe = conv.unsafe_options(chosen_policy, accel)
            if unsafe:
                raise InvalidInput(f"refusing to migrate {vm}: {'; '.join(unsafe)}")
            now = time.time()
            m = Migration(id=uuid.uuid4().hex[:12], vm=vm, source=inst.host, target=chosen.name,
                          verify_memory=verify_memory, reason=reason, created_at=now,
                          tls=self.migrator.policy.tls if tls is None else tls,
                          policy=chosen_policy.name, policy_reason=why)
            if notified_at is not None:
                m.enter(Phase.NOTIFIED, notified_at)   # the guest was told before anything was reserved
            m.enter(Phase.PENDING, now)
            inst.state = InstanceState.MIGRATING
            with self.store.transaction():   # reservation on the target and the VM's state, together
                self.store.put_migration(m)
                self.store.put_instance(inst)
        task = asyncio.create_task(self.migrator.run(m), name=f"migration-{m.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return m

    def migration(self, migration_id: str) -> Migration:
        m = self.store.get_migration(migration_id)
        if m is None:
            raise NotFound(f"unknown migration {migration_id!r}")
        return m

    async def recover(self) -> None:
        """After a controller restart, no migration may stay half-done: roll back those in flight."""
        for m in self.store.list_migrations():
            if m.done:
                continue
            if m.entered_at(Phase.POSTMIGRATION) is not None:
                # Placement already moved to the target: only the source's cleanup is left.
                try:
                    await self.agent_for(m.source).delete_vm(m.vm)
                except AgentError as exc:
                    m.error = f"source cleanup after restart failed: {exc}"
                m.enter(Phase.COMPLETED, time.time())
                self.store.put_migration(m)
                continue
            log.warning("migration %s of %s was in flight at restart; rolling back", m.id, m.vm)
            await self.migrator._roll_back(m, self.agent_for(m.source), self.agent_for(m.target),
                                           completed_on_source=m.entered_at(Phase.BLACKOUT) is not None,
                                           phase=Phase.ABORTED, reason="controller restarted during the migration")

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await self.agents.close()

"""One live migration, driven as a persisted state machine.

pending -> target-ready -> connected -> precopy -> blackout -> [verifying] ->
postmigration -> completed; or aborted / failed, rolled back so that the VM
keeps running on its source. Like Ganeti, source and target are always
finalized as a pair, and the VM's placement is recorded only after both ends
have succeeded (the target runs, the source has handed over).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import statistics

from ferry.controller import convergence as conv
from ferry.controller.agent_client import AgentClient
from ferry.controller.policy import MigrationPolicy
from ferry.model import InstanceState, Migration, Phase
from ferry.qemu.memcheck import differing_pages
from ferry.store import Store

log = logging.getLogger(__name__)


class MigrationAborted(Exception):
    """Rolled back before switchover; the VM runs on its source."""


class MigrationFailed(Exception):
    """Something was wrong after the stream completed (e.g. memory differs); rolled back too."""


class Migrator:
    def __init__(self, store: Store, agent_for: Callable[[str], AgentClient], policy: MigrationPolicy,
                 clock: Callable[[], float] = time.time, source_dn: Callable[[str], str] | None = None):
        self.store = store
        self.agent_for = agent_for
        self.policy = policy
        self.clock = clock
        self.source_dn = source_dn     # host name -> the TLS identity a target must require of it
        self.policies = conv.load_policies(policy.policies_file) if policy.policies_file else dict(conv.BUILTIN_POLICIES)
        if policy.convergence not in self.policies:
            raise conv.PolicyError(f"unknown default convergence policy {policy.convergence!r}")

    def choose_policy(self, vm_policy: str | None, event_policy: str | None) -> tuple[conv.ConvergencePolicy, str]:
        """The VM's own policy wins, then the maintenance event's, then the default."""
        return conv.select_policy(self.policies, vm_policy, event_policy, self.policy.convergence)

    def link_bandwidth(self) -> float:
        """Bytes/s the link is expected to carry: what recent migrations achieved, else the setting."""
        done = [m.stats.mbps for m in self.store.list_migrations()[-10:] if m.phase is Phase.COMPLETED and m.stats.mbps]
        if done:
            return statistics.median(done) * 1e6 / 8
        return self.policy.link_bandwidth_mib_s * conv.MIB

    def _enter(self, m: Migration, phase: Phase, at: float | None = None) -> None:
        m.enter(phase, at if at is not None else self.clock())
        self.store.put_migration(m)
        log.info("migration %s of %s: %s", m.id, m.vm, phase.value)

    async def run(self, m: Migration) -> Migration:
        inst = self.store.get_instance(m.vm)
        src, dst = self.agent_for(m.source), self.agent_for(m.target)
        spec = inst.spec
        target_made = False
        completed_on_source = False
        forwarding = False
        try:
            policy = self.policies[m.policy]
            memory = spec.memory_mib * conv.MIB
            dirty = (await src.dirty_rate(m.vm))["bytes_s"]
            prediction = conv.plan(policy, memory, dirty, self.link_bandwidth())
            m.prediction = prediction.to_dict()
            m.stats.dirty_rate_measured_mib_s = round(dirty / conv.MIB, 1)
            setup = policy.qemu_setup()
            self.store.put_migration(m)
            source_dn = None
            if m.tls:
                if self.source_dn is None:
                    raise MigrationAborted("TLS migration needs the controller to have the fleet PKI (--pki-dir)")
                source_dn = self.source_dn(m.source)
            body = {"name": inst.name, "ip": inst.ip, "mac": inst.mac, "memory_mib": spec.memory_mib,
                    "vcpus": spec.vcpus, "workload": str(spec.workload), "start_paused": m.verify_memory,
                    "source_dn": source_dn, "setup": setup["target"]}
            incoming = await dst.prepare_incoming(body)
            target_made = True
            if self.policy.forwarding:
                # Ready before switchover, so the source can forward from the first packet on.
                await dst.forwarding(m.vm, "accept", self.store.get_host(m.source).underlay_ip)
            self._enter(m, Phase.TARGET_READY)
            forward_to = self.store.get_host(m.target).underlay_ip if self.policy.forwarding else None
            started = await src.migrate(m.vm, {"uri": incoming["uri"], "forward_to": forward_to,
                                               "tls_hostname": m.target if m.tls else None, "setup": setup["source"]})
            t0 = started["started_at"]
            self._enter(m, Phase.CONNECTED, t0)
            final = await self._monitor(m, src, t0, policy, conv.start(policy, prediction, memory, self.clock()), dst)
            completed_on_source = True
            self._record_stream_stats(m, final)
            if self.policy.forwarding:
                # The source agent tunnels the VM's packets to the target the moment the stream
                # completes (they queue on the target's tap until it runs).
                forwarding = True
                at = await self._wait_forwarding(src, m.vm, t0)
                self._enter(m, Phase.FORWARDING, at)
            if m.verify_memory:
                await self._verify(m, src, dst)
                await dst.resume(m.vm)
            resume_at = await self._wait_resume(dst, m.vm, t0)
            if m.entered_at(Phase.POSTCOPY) is not None:
                m.stats.postcopy_blocktime_ms = (await dst.migration_status(m.vm, t0))["sample"].get("postcopy_blocktime_ms")
        except Exception as exc:  # noqa: BLE001 - every failure must end in a rollback
            aborted = isinstance(exc, MigrationAborted)
            reason = str(exc) or exc.__class__.__name__
            if forwarding:
                try:
                    await src.forwarding(m.vm, "stop")     # the source's tap gets its route back
                except Exception as exc:  # noqa: BLE001
                    reason += f"; stopping forwarding failed: {exc}"
            await self._roll_back(m, src, dst if target_made else None, completed_on_source,
                                  Phase.ABORTED if aborted else Phase.FAILED, reason)
            return m

        stop_at = m.entered_at(Phase.BLACKOUT)
        m.stats.blackout_ms = round((resume_at - stop_at) * 1000, 2) if stop_at else None
        self._enter(m, Phase.POSTMIGRATION, resume_at)
        # Both ends succeeded: the target runs and the source has handed over. Record placement.
        inst.host, inst.state, inst.migrations = m.target, InstanceState.RUNNING, inst.migrations + 1
        self.store.put_instance(inst)
        try:
            await self._post_migration(m, src, dst)
        except Exception as exc:  # noqa: BLE001 - the VM runs on the target; cleanup can be retried
            m.error = f"switchover done, but the post-migration steps failed: {exc}"
            log.warning("migration %s: %s", m.id, m.error)
        self._enter(m, Phase.COMPLETED)
        self._finish_stats(m)
        m.finished_at = self.clock()
        self.store.put_migration(m)
        return m

    async def _post_migration(self, m: Migration, src: AgentClient, dst: AgentClient) -> None:
        """Post-migration brownout: the source forwards the VM's packets until the fabric has caught up."""
        await dst.activate(m.vm)
        deadline = self.clock() + self.policy.fabric_timeout_s
        while not (await dst.route(m.vm))["here"]:
            if self.clock() > deadline:
                raise MigrationFailed(f"the fabric did not route {m.vm} to {m.target} within {self.policy.fabric_timeout_s:.0f} s")
            await asyncio.sleep(0.05)
        self._enter(m, Phase.FABRIC_UPDATED)
        if self.policy.forwarding:
            await asyncio.sleep(self.policy.forwarding_grace_s)
            stopped = await src.forwarding(m.vm, "stop")
            m.stats.forwarded_packets = ((stopped.get("counters") or {}).get("tx_packets"))
            await dst.forwarding(m.vm, "stop-accepting")
        self._enter(m, Phase.SOURCE_CLEANUP)
        await src.delete_vm(m.vm)

    async def _monitor(self, m: Migration, src: AgentClient, t0: float, policy: conv.ConvergencePolicy,
                       state: conv.MonitorState, dst: AgentClient | None = None) -> dict:
        """Sample the source every policy.sample_interval_s; the convergence engine decides
        (raise the downtime limit, throttle, post-copy, abort) and the source agent acts.
        A post-copy whose link stalls is paused and recovered (the VM waits; it is never lost)."""
        since = t0 - 0.05
        moved_at, last_sent = self.clock(), -1
        notes: list[dict] = []
        while True:
            st = await src.migration_status(m.vm, since)
            sample = st["sample"]
            if sample["transferred"] != last_sent:
                moved_at, last_sent = self.clock(), sample["transferred"]
            if dst is not None and sample["status"] == "postcopy-active" \
                    and self.clock() - moved_at > self.policy.postcopy_stall_s:
                self._note(m, state, notes, f"post-copy sent nothing for {self.clock() - moved_at:.1f} s: pausing it")
                await src.postcopy_pause(m.vm)
                try:
                    await dst.postcopy_pause(m.vm)     # the target may not notice a dead link by itself
                except Exception:  # noqa: BLE001 - it may have paused already
                    pass
                moved_at = self.clock()
                continue
            if dst is not None and sample["status"] == "postcopy-paused":
                await self._recover_postcopy(m, src, dst, state, notes)
                moved_at = self.clock()
                continue
            m.progress = sample
            rate = sample.get("dirty_rate_mib_s") or 0.0
            m.stats.max_dirty_rate_mib_s = max(m.stats.max_dirty_rate_mib_s or 0.0, rate)
            self._enter_observed(m, st)
            actions, state = conv.decide(policy, state, sample, self.clock())
            m.decisions = sorted(state.decision_log() + notes, key=lambda d: d["elapsed_s"])
            for action in actions:
                if action.kind is conv.ActionKind.ABORT:
                    raise MigrationAborted(f"{policy.name}: {action.reason}")
                await src.migration_action(m.vm, action.to_dict())
            status = sample["status"]
            if status == "completed":
                self._enter_observed(m, await src.migration_status(m.vm, since))
                return sample
            if status in ("failed", "cancelled"):
                if m.entered_at(Phase.POSTCOPY) is not None:
                    raise MigrationFailed(f"post-copy {status}: {sample.get('error') or 'no detail'}")
                raise MigrationAborted(f"QEMU reports the migration {status}: {sample.get('error') or 'no detail'}")
            self.store.put_migration(m)
            await asyncio.sleep(policy.sample_interval_s)

    def _note(self, m: Migration, state: conv.MonitorState, notes: list[dict], reason: str) -> None:
        """A decision of the migrator's own (post-copy recovery), logged beside the engine's."""
        notes.append({"elapsed_s": round(self.clock() - state.started_at, 3), "kind": "note", "reason": reason,
                      "params": {}, "status": (m.progress or {}).get("status", ""), "iteration": 0})
        m.decisions = sorted(state.decision_log() + notes, key=lambda d: d["elapsed_s"])
        log.warning("migration %s of %s: %s", m.id, m.vm, reason)
        self.store.put_migration(m)

    async def _recover_postcopy(self, m: Migration, src: AgentClient, dst: AgentClient,
                                state: conv.MonitorState, notes: list[dict]) -> None:
        """QEMU's post-copy recovery: the target listens anew, the source resumes the stream.
        Retried until the link is back or postcopy_recovery_s has passed."""
        deadline = self.clock() + self.policy.postcopy_recovery_s
        self._note(m, state, notes, "post-copy paused (link lost): both ends keep the VM paused; recovering")
        while self.clock() < deadline:
            try:
                target_status = (await dst.migration_status(m.vm))["sample"]["status"]
                if target_status == "postcopy-active":
                    await dst.postcopy_pause(m.vm)
                    target_status = (await dst.migration_status(m.vm))["sample"]["status"]
                if target_status == "postcopy-paused":
                    uri = (await dst.postcopy_recover(m.vm))["uri"]
                    await src.postcopy_resume(m.vm, uri)
                for _ in range(20):
                    status = (await src.migration_status(m.vm))["sample"]["status"]
                    if status not in ("postcopy-paused", "postcopy-recover"):
                        m.stats.postcopy_recoveries = (m.stats.postcopy_recoveries or 0) + 1
                        self._note(m, state, notes, f"post-copy recovered: {status}")
                        return
                    await asyncio.sleep(0.25)
            except Exception as exc:  # noqa: BLE001 - the link may still be down; try again
                log.info("migration %s: post-copy recovery attempt failed: %s", m.id, exc)
            await asyncio.sleep(1.0)
        raise MigrationFailed(f"post-copy could not be recovered within {self.policy.postcopy_recovery_s:.0f} s;"
                              " the VM is paused on its target, not lost")

    def _enter_observed(self, m: Migration, st: dict) -> None:
        """Phases QEMU's events have timed, entered in the order they happened."""
        seen: list[tuple[float, Phase]] = []
        for ev in st["migration_events"]:
            if ev["status"] == "active":
                seen.append((ev["at"], Phase.PRECOPY))
            elif ev["status"] == "postcopy-active":
                seen.append((ev["at"], Phase.POSTCOPY))
        if st["stop_at"]:
            seen.append((st["stop_at"], Phase.BLACKOUT))
        for at, phase in sorted(seen, key=lambda x: x[0]):
            if m.entered_at(phase) is None:
                self._enter(m, phase, at)
        done = next((ev["at"] for ev in st["migration_events"] if ev["status"] == "completed"), None)
        post = m.entered_at(Phase.POSTCOPY)
        if done and post:
            m.stats.postcopy_s = round(done - post, 3)

    async def _verify(self, m: Migration, src: AgentClient, dst: AgentClient) -> None:
        self._enter(m, Phase.VERIFYING)
        started = self.clock()
        a, b = await asyncio.gather(src.page_digests(m.vm), dst.page_digests(m.vm))
        diff = differing_pages(a, b)
        m.stats.pages_compared = max(len(a), len(b)) // 8
        m.stats.pages_different = len(diff)
        m.stats.verify_ms = round((self.clock() - started) * 1000, 1)
        if diff:
            raise MigrationFailed(
                f"memory verification failed: {len(diff)} of {m.stats.pages_compared} guest pages differ"
                f" between source and target (first: {', '.join(hex(p * 4096) for p in diff[:5])})")

    async def _wait_forwarding(self, src: AgentClient, vm: str, t0: float, timeout_s: float = 10.0) -> float:
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            st = await src.migration_status(vm, t0 - 0.05)
            if st.get("forwarding_started_at"):
                return st["forwarding_started_at"]
            await asyncio.sleep(0.02)
        raise MigrationFailed(f"the source did not start forwarding within {timeout_s:.0f} s")

    async def _wait_resume(self, dst: AgentClient, vm: str, t0: float, timeout_s: float = 30.0) -> float:
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            st = await dst.migration_status(vm, t0 - 0.05)
            if st["resume_at"]:
                return st["resume_at"]
            if st["sample"]["status"] == "failed":
                raise MigrationFailed(f"target failed to load the VM: {st['sample'].get('error') or 'no detail'}")
            await asyncio.sleep(0.05)
        raise MigrationFailed(f"target did not resume the VM within {timeout_s:.0f} s")

    async def _roll_back(self, m: Migration, src: AgentClient, dst: AgentClient | None,
                         completed_on_source: bool, phase: Phase, reason: str) -> None:
        """Target first, then source: the VM must never run in two places."""
        log.warning("migration %s of %s: rolling back: %s", m.id, m.vm, reason)
        target_gone = True
        if dst is not None:
            try:
                await dst.delete_vm(m.vm)
            except Exception as exc:  # noqa: BLE001
                target_gone = False
                reason += f"; and the target VM could not be deleted: {exc}"
        inst = self.store.get_instance(m.vm)
        if target_gone or not completed_on_source:
            try:
                await src.cancel_migration(m.vm)
                inst.state = InstanceState.RUNNING
            except Exception as exc:  # noqa: BLE001
                inst.state = InstanceState.ERROR
                reason += f"; and the source VM could not be resumed: {exc}"
        else:
            inst.state = InstanceState.ERROR
            reason += "; the VM stays paused on its source until the target is known to be gone"
        inst.error = None if inst.state is InstanceState.RUNNING else reason
        self.store.put_instance(inst)
        m.error = reason
        self._enter(m, phase)
        self._finish_stats(m)
        m.finished_at = self.clock()
        self.store.put_migration(m)

    def _record_stream_stats(self, m: Migration, final: dict) -> None:
        m.stats.qemu_downtime_ms = final.get("downtime_ms")
        m.stats.bytes_transferred = final.get("transferred")
        m.stats.ram_total_bytes = final.get("total")
        m.stats.dirty_sync_count = final.get("dirty_sync_count")
        m.stats.dirty_pages_rate = final.get("dirty_pages_rate")
        m.stats.mbps = final.get("mbps")
        m.stats.setup_ms = final.get("setup_time_ms")

    def _finish_stats(self, m: Migration) -> None:
        precopy = m.entered_at(Phase.PRECOPY)
        ends = [t for t in (m.entered_at(Phase.POSTCOPY), m.entered_at(Phase.BLACKOUT)) if t]
        blackout = min(ends) if ends else None
        post, cleanup = m.entered_at(Phase.POSTMIGRATION), m.entered_at(Phase.SOURCE_CLEANUP)
        fabric = m.entered_at(Phase.FABRIC_UPDATED)
        if precopy and blackout:
            m.stats.precopy_s = round(blackout - precopy, 3)
        if post and cleanup:
            m.stats.postmigration_s = round(cleanup - post, 3)
        if post and fabric:
            m.stats.fabric_update_s = round(fabric - post, 3)
        end = m.timeline[-1][1] if m.timeline else self.clock()
        m.stats.total_s = round(end - m.created_at, 3)

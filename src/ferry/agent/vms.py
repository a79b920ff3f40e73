"""VM lifecycle on one host: boot, receive, send, pause/resume, delete, re-attach.

Each VM lives in `<state>/vms/<name>/`: `vm.json` (what it is), and QEMU's
QMP socket, pidfile and console log. QEMU is daemonized, so VMs outlive the
agent; on start the agent re-attaches to every VM whose QEMU still runs.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from ferry.agent.settings import AgentSettings
from ferry.model import Conflict, InvalidInput, NoCapacity, NotFound
from ferry.model.instance import InstanceSpec
from ferry.net.addressing import GATEWAY_IP, tap_name
from ferry.net import forwarding
from ferry.net.fabric import fabric_from_spec
from ferry.net.garp import send_garp
from ferry.net import ipcmd
from ferry.net.vmnet import create_vm_tap, delete_vm_tap, ensure_metadata_address
from ferry.agent.metadata import MetadataService
from ferry.qemu import memcheck
from ferry.qemu.image import GuestImage, find_image, kernel_cmdline
from ferry.qemu.launch import LaunchSpec, read_pid, start_qemu, stop_qemu
from ferry.qemu import convergence
from ferry.qemu.dirtyrate import measure_dirty_rate
from ferry.qemu.migration import MigrationSettings, apply_settings, incoming_port, sample
from ferry.qemu.session import QmpSession

log = logging.getLogger(__name__)
MEMLOAD_ERROR = re.compile(r"MEMLOAD ERROR")


def free_port(ip: str) -> int:
    """A port free on `ip` now (for QEMU to listen on; the race with other listeners is harmless here)."""
    import socket
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def create_route_to_tap(ip: str, tap: str) -> None:
    ipcmd.ip("route", "replace", f"{ip}/32", "dev", tap)


def vm_id(name: str) -> int:
    """A stable numeric instance id, as GCE's metadata server reports one."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big")


def guest_cmdline(name: str, ip: str, spec: InstanceSpec) -> str:
    """The kernel command line of every guest this agent launches (pti=on included, see image.py)."""
    memload = spec.workload.kind == "memload"
    return kernel_cmdline(
        name, ip, GATEWAY_IP,
        memload_size_mib=spec.workload.memload_size(spec.memory_mib) if memload else None,
        memload_rate_mib_s=spec.workload.rate_mib_s if memload else None)


@dataclass
class VmRecord:
    name: str
    ip: str
    mac: str
    spec: dict            # InstanceSpec.to_dict()
    launch: dict          # LaunchSpec.to_dict()
    role: str             # "booted" | "incoming"
    created_at: float

    @property
    def launch_spec(self) -> LaunchSpec:
        return LaunchSpec.from_dict(self.launch)


class HostVm:
    def __init__(self, record: VmRecord, qmp: QmpSession, pid: int):
        self.record = record
        self.qmp = qmp
        self.pid = pid
        self.migration_started_at: float | None = None
        self.announce_task: asyncio.Task | None = None
        self.forward_task: asyncio.Task | None = None
        self.forwarding_started_at: float | None = None
        self.lock = asyncio.Lock()


class VmManager:
    def __init__(self, settings: AgentSettings):
        self.settings = settings
        self.fabric = fabric_from_spec(settings.fabric)
        self.vms: dict[str, HostVm] = {}
        self.maintenance_events: dict[str, tuple[str, dict | None]] = {}   # vm -> (value, upcoming)
        self.metadata: MetadataService | None = None   # the guests' GCE-compatible metadata server
        self._create_lock = asyncio.Lock()   # capacity is checked and taken under it

    # ---- helpers -------------------------------------------------------------------------
    def image(self) -> GuestImage:
        image = find_image(self.settings.image_dir)
        if image is None:
            raise InvalidInput("no guest image on this host: run `ferry image build` first")
        return image

    def get(self, name: str) -> HostVm:
        vm = self.vms.get(name)
        if vm is None:
            raise NotFound(f"no VM {name!r} on host {self.settings.name}")
        return vm

    def used_memory_mib(self) -> int:
        return sum(v.record.spec["memory_mib"] for v in self.vms.values())

    def _record_path(self, name: str) -> Path:
        return self.settings.vms_dir / name / "vm.json"

    def _save(self, record: VmRecord) -> None:
        path = self._record_path(record.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=1))
        tmp.replace(path)

    # ---- start-up --------------------------------------------------------------------------
    async def start_metadata(self) -> None:
        if self.settings.metadata == "off":
            return
        ip, _, port = self.settings.metadata.rpartition(":")
        await asyncio.to_thread(ensure_metadata_address)
        self.metadata = MetadataService(ip, int(port))
        await self.metadata.start()

    async def _serve_metadata(self, record: "VmRecord") -> None:
        if self.metadata is not None and record.launch.get("tap"):
            await self.metadata.add_vm(record.name, record.launch["tap"], vm_id(record.name))
            value, upcoming = self.maintenance_events.get(record.name, ("NONE", None))
            self.metadata.set_maintenance_event(record.name, value, upcoming)

    async def restore(self) -> None:
        """Re-attach to the VMs whose QEMU survived an agent restart; clean up the rest."""
        await self.start_metadata()
        if not self.settings.vms_dir.exists():
            return
        for path in sorted(self.settings.vms_dir.glob("*/vm.json")):
            record = VmRecord(**json.loads(path.read_text()))
            spec = record.launch_spec
            pid = read_pid(spec.pidfile)
            if pid is None:
                log.warning("VM %s: QEMU is gone; removing its leftovers", record.name)
                await self._cleanup_files(record)
                continue
            qmp = QmpSession(record.name, spec.qmp_socket)
            await qmp.connect()
            self.vms[record.name] = HostVm(record, qmp, pid)
            await self._serve_metadata(record)
            log.info("re-attached to VM %s (pid %d)", record.name, pid)

    # ---- lifecycle -------------------------------------------------------------------------
    async def _launch(self, name: str, ip: str, mac: str, spec: InstanceSpec, incoming: bool,
                      start_paused: bool) -> HostVm:
        async with self._create_lock:
            if name in self.vms:
                raise Conflict(f"VM {name!r} already exists on host {self.settings.name}")
            free = self.settings.memory_mib - self.used_memory_mib()
            if spec.memory_mib > free:
                raise NoCapacity(
                    f"host {self.settings.name} has {free} MiB free, VM {name!r} needs {spec.memory_mib} MiB")
            image = self.image()
            launch = LaunchSpec(
                name=name, memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                kernel=str(image.kernel), initrd=str(image.initrd),
                cmdline=guest_cmdline(name, ip, spec),
                mac=mac, tap=tap_name(name), run_dir=str(self.settings.vms_dir / name),
                accel=self.settings.accel, incoming=incoming, start_paused=start_paused,
            )
            record = VmRecord(name, ip, mac, spec.to_dict(), launch.to_dict(),
                              "incoming" if incoming else "booted", time.time())
            self._save(record)
            # Placeholder so a concurrent create of the same name or capacity check sees it.
            self.vms[name] = HostVm(record, QmpSession(name, launch.qmp_socket), 0)
        try:
            await asyncio.to_thread(lambda: create_vm_tap(launch.tap, ip, vm_mac=mac))
            await self._serve_metadata(record)
            pid = await start_qemu(launch, self.settings.qemu_binary)
            qmp = QmpSession(name, launch.qmp_socket)
            await qmp.connect()
        except Exception:
            self.vms.pop(name, None)
            await self._cleanup_files(record)
            raise
        vm = HostVm(record, qmp, pid)
        self.vms[name] = vm
        return vm

    async def create(self, name: str, ip: str, mac: str, spec: InstanceSpec) -> dict:
        vm = await self._launch(name, ip, mac, spec, incoming=False, start_paused=False)
        await asyncio.to_thread(self.fabric.announce, ip, self.settings.underlay_ip)
        return self.describe(vm)

    async def _tls_objects(self, vm: HostVm, endpoint: str, peer_dn: str | None = None,
                           hostname: str | None = None) -> None:
        """QEMU TLS for one migration: this host's credentials and, on the target, the one
        source allowed to connect (an authz-simple holding its DN). Removed by `_tls_cleanup`."""
        if self.settings.pki_dir is None:
            raise InvalidInput(f"host {self.settings.name} has no fleet PKI; it cannot use TLS migration")
        await self._tls_cleanup(vm)
        await vm.qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": "ferry-tls",
                                            "dir": str(self.settings.qemu_tls_dir), "endpoint": endpoint,
                                            "verify-peer": True})
        params: dict = {"tls-creds": "ferry-tls"}
        if peer_dn is not None:
            await vm.qmp.execute("object-add", {"qom-type": "authz-simple", "id": "ferry-authz", "identity": peer_dn})
            params["tls-authz"] = "ferry-authz"
        if hostname is not None:
            params["tls-hostname"] = hostname
        await vm.qmp.execute("migrate-set-parameters", params)

    async def _tls_cleanup(self, vm: HostVm) -> None:
        try:
            await vm.qmp.execute("migrate-set-parameters", {"tls-creds": "", "tls-authz": "", "tls-hostname": ""})
        except Exception:  # noqa: BLE001 - nothing set yet
            pass
        for obj in ("ferry-authz", "ferry-tls"):
            try:
                await vm.qmp.execute("object-del", {"id": obj})
            except Exception:  # noqa: BLE001 - not there
                pass

    async def prepare_incoming(self, name: str, ip: str, mac: str, spec: InstanceSpec,
                               start_paused: bool, source_dn: str | None = None, setup: dict | None = None) -> dict:
        """An empty target VM waiting for a migration stream on this host's underlay address.
        With `source_dn`, the stream must be TLS from exactly that source host; `setup` is the
        target's half of the convergence policy's capabilities (post-copy, multifd, ...)."""
        vm = await self._launch(name, ip, mac, spec, incoming=True, start_paused=start_paused)
        try:
            if source_dn is not None:
                await self._tls_objects(vm, "server", peer_dn=source_dn)
            await vm.qmp.execute("migrate-set-capabilities",
                                 {"capabilities": [{"capability": "events", "state": True}]})
            if setup:
                await convergence.prepare_target(vm.qmp, {"source": {}, "target": setup})
            await vm.qmp.execute("migrate-incoming", {"uri": f"tcp:{self.settings.underlay_ip}:0"})
            port = incoming_port(await vm.qmp.execute("query-migrate"))
            if port is None:
                raise RuntimeError("target QEMU did not report its listening port")
        except Exception:
            await self.delete(name)
            raise
        return {"uri": f"tcp:{self.settings.underlay_ip}:{port}", "pid": vm.pid}

    async def start_migration(self, name: str, uri: str, settings: MigrationSettings,
                              forward_to: str | None = None, tls_hostname: str | None = None,
                              setup: dict | None = None) -> dict:
        """Start sending. With `forward_to` (the target's underlay address), the VM's packets are
        tunnelled there the moment the source stops running the VM (stream completed, or post-copy
        started), not when a controller notices. With `tls_hostname`, the stream is TLS and the
        target must present that host's certificate. `setup`: the source's half of the policy."""
        vm = self.get(name)
        if setup:
            await convergence.prepare_source(vm.qmp, {"source": setup, "target": {}})
        else:
            await apply_settings(vm.qmp, settings)
        if tls_hostname is not None:
            await self._tls_objects(vm, "client", hostname=tls_hostname)
        else:
            await self._tls_cleanup(vm)
        vm.migration_started_at = started = time.time()
        vm.forwarding_started_at = None
        await vm.qmp.execute("migrate", {"uri": uri})
        if forward_to:
            await asyncio.to_thread(forwarding.prepare_forwarding, vm.record.ip, self.settings.underlay_ip, forward_to)
            vm.forward_task = asyncio.create_task(self._forward_on_completion(vm, started, forward_to))
        return {"started_at": started}

    async def _forward_on_completion(self, vm: HostVm, since: float, peer: str) -> None:
        # The source stops running the guest at its STOP (the switchover): from then on packets
        # for it would queue on a tap nobody reads. Tunnelled, they queue on the target's tap
        # and reach the guest when it resumes there. A rollback stops the tunnel again.
        event = await vm.qmp.wait_for(
            lambda e: e.at >= since and (e.name == "STOP" or (
                e.name == "MIGRATION" and e.data.get("status") in ("completed", "postcopy-active", "failed", "cancelled"))),
            timeout_s=24 * 3600)
        if event.name == "STOP" or event.data.get("status") in ("completed", "postcopy-active"):
            await asyncio.to_thread(forwarding.activate_forwarding, vm.record.ip)
            vm.forwarding_started_at = time.time()
        else:
            await asyncio.to_thread(forwarding.stop_forwarding, vm.record.ip)   # the prepared tunnel

    async def migration_status(self, name: str, since: float = 0.0) -> dict:
        vm = self.get(name)
        s = await sample(vm.qmp)
        stop = next((e for e in vm.qmp.events if e.name == "STOP" and e.at >= since), None)
        resume = next((e for e in vm.qmp.events if e.name == "RESUME" and e.at >= since), None)
        statuses = [{"status": e.data.get("status"), "at": e.at}
                    for e in vm.qmp.events if e.name == "MIGRATION" and e.at >= since]
        return {
            "sample": s.to_dict(),
            "migration_events": statuses,
            "stop_at": stop.at if stop else None,
            "resume_at": resume.at if resume else None,
            "runstate": await self.runstate(vm),
            "forwarding_started_at": vm.forwarding_started_at,
        }

    async def migration_action(self, name: str, action: dict) -> dict:
        """One decision of the controller's convergence loop, as one QMP command."""
        return await convergence.apply_action(self.get(name).qmp, action)

    async def postcopy_pause(self, name: str) -> dict:
        """Post-copy's link is stuck: pause it (the VM waits, it is not lost) so that it can be recovered."""
        vm = self.get(name)
        await vm.qmp.execute("migrate-pause")
        return {"status": (await sample(vm.qmp)).status}

    async def postcopy_recover(self, name: str) -> dict:
        """Target: listen for the resumed post-copy stream on a new port of the underlay address."""
        vm = self.get(name)
        port = free_port(self.settings.underlay_ip)
        await vm.qmp.execute("migrate-recover", {"uri": f"tcp:{self.settings.underlay_ip}:{port}"})
        return {"uri": f"tcp:{self.settings.underlay_ip}:{port}"}

    async def postcopy_resume(self, name: str, uri: str) -> dict:
        """Source: reconnect a paused post-copy to the target's recovery address."""
        vm = self.get(name)
        await vm.qmp.execute("migrate", {"uri": uri, "resume": True})
        return {"status": (await sample(vm.qmp)).status}

    async def dirty_rate(self, name: str) -> dict:
        """The guest's dirty rate now (calc-dirty-rate, page sampling), before a migration."""
        vm = self.get(name)
        rate = await measure_dirty_rate(vm.qmp, calc_time_s=1)
        return {"bytes_s": rate, "mib_s": round(rate / 2**20, 1)}

    async def cancel_migration(self, name: str) -> dict:
        """Roll back on the source: stop sending and make sure the guest runs here."""
        vm = self.get(name)
        if vm.forward_task is not None:
            vm.forward_task.cancel()
        if vm.forward_task is not None:
            await self.forwarding(name, "stop", None)      # prepared or active: the tap gets its route back
            vm.forwarding_started_at = vm.forward_task = None
        await vm.qmp.execute("migrate_cancel")
        for _ in range(100):
            s = await sample(vm.qmp)
            if s.status not in ("cancelling", "active", "setup", "device", "pre-switchover"):
                break
            await asyncio.sleep(0.05)
        await self._tls_cleanup(vm)
        return await self.resume(name)

    async def resume(self, name: str) -> dict:
        vm = self.get(name)
        if await self.runstate(vm) != "running":
            await vm.qmp.execute("cont")
        return self.describe(vm) | {"runstate": await self.runstate(vm)}

    async def runstate(self, vm: HostVm) -> str:
        return (await vm.qmp.execute("query-status"))["status"]

    async def page_digests(self, name: str) -> bytes:
        vm = self.get(name)
        state = await self.runstate(vm)
        if state == "running":
            raise Conflict(f"VM {name!r} is running; memory can only be compared while paused")
        return await memcheck.page_digests(vm.qmp, vm.record.spec["memory_mib"], vm.record.launch["run_dir"])

    async def activate(self, name: str) -> dict:
        """After switchover: this host now owns the VM. Announce it to the guest's neighbours
        (QEMU's announce-self, and a gratuitous ARP for the gateway) and to the fabric, which
        takes its propagation delay to route the address here (in the background)."""
        vm = self.get(name)
        vm.record.role = "booted"
        self._save(vm.record)
        await self._tls_cleanup(vm)
        try:
            await vm.qmp.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})
            await asyncio.to_thread(send_garp, vm.record.launch["tap"])
        except Exception as exc:  # noqa: BLE001 - announcements are an optimisation
            log.warning("announcements for %s failed: %s", name, exc)
        vm.announce_task = asyncio.create_task(
            self.fabric.announce_delayed(vm.record.ip, self.settings.underlay_ip))
        return self.describe(vm) | {"fabric_delay_s": self.fabric.propagation_delay_s}

    async def route(self, name: str) -> dict:
        """Whether the fabric already routes the VM's address to this host."""
        vm = self.get(name)
        via = await asyncio.to_thread(self.fabric.lookup, vm.record.ip)
        return {"vm": name, "fabric_via": via, "here": via == self.settings.underlay_ip}

    async def forwarding(self, name: str, action: str, peer_underlay: str | None) -> dict:
        """Post-migration forwarding over VXLAN: the target accepts, the source forwards."""
        vm = self.get(name)
        ip, local = vm.record.ip, self.settings.underlay_ip
        if action == "accept":
            handle = await asyncio.to_thread(forwarding.accept_forwarding, ip, local, peer_underlay)
            return handle.to_dict()
        if action == "start":
            handle = await asyncio.to_thread(forwarding.start_forwarding, ip, local, peer_underlay)
            return handle.to_dict()
        counters = await asyncio.to_thread(forwarding.forwarding_counters, ip)
        if action == "stop-accepting":
            return {"removed": await asyncio.to_thread(forwarding.stop_accepting, ip), "counters": counters}
        removed = await asyncio.to_thread(forwarding.stop_forwarding, ip)
        # The VM's packets go back to its tap here: what a rollback needs; harmless before a delete.
        await asyncio.to_thread(create_route_to_tap, ip, vm.record.launch["tap"])
        return {"removed": removed, "counters": counters}

    async def delete(self, name: str) -> None:
        vm = self.get(name)
        async with vm.lock:
            for task in (vm.announce_task, vm.forward_task):
                if task is not None:
                    task.cancel()
            await vm.qmp.close()
            if vm.pid:
                await stop_qemu(vm.pid, name)
            await self._cleanup_files(vm.record)
            self.vms.pop(name, None)

    async def _cleanup_files(self, record: VmRecord) -> None:
        launch = record.launch_spec
        self.maintenance_events.pop(record.name, None)
        if self.metadata is not None:
            await self.metadata.remove_vm(record.name)
        self._archive_console(launch)
        if launch.tap:
            await asyncio.to_thread(delete_vm_tap, launch.tap)
        await asyncio.to_thread(forwarding.stop_accepting, record.ip)
        # Withdraw only removes the route if it still points here (never the target's).
        await asyncio.to_thread(self.fabric.withdraw, record.ip, self.settings.underlay_ip)
        shutil.rmtree(launch.run_dir, ignore_errors=True)

    async def close(self) -> None:
        for vm in self.vms.values():
            await vm.qmp.close()
        if self.metadata is not None:
            await self.metadata.stop()

    async def set_maintenance_event(self, name: str, value: str, upcoming: dict | None) -> dict:
        """What the guest's metadata server says about host maintenance (GCE semantics)."""
        self.get(name)
        self.maintenance_events[name] = (value, upcoming)
        if self.metadata is not None:
            self.metadata.set_maintenance_event(name, value, upcoming)
        return {"name": name, "maintenance_event": value, "set_at": time.time()}

    def _archive_console(self, launch: LaunchSpec) -> None:
        """Keep a deleted VM's serial console (memload errors, maintenance notices) for post-mortems."""
        console = Path(launch.console_log)
        if console.exists():
            archive = self.settings.state_dir / "console-archive"
            archive.mkdir(parents=True, exist_ok=True)
            console.replace(archive / f"{launch.name}.{time.time():.3f}.log")

    async def shutdown(self, name: str, grace_s: float = 15.0) -> dict:
        """Ask the guest to power off (ACPI), then end QEMU if it has not within the grace period."""
        vm = self.get(name)
        clean = False
        try:
            await vm.qmp.execute("system_powerdown")
            await vm.qmp.wait_for_event("SHUTDOWN", timeout_s=grace_s)
            clean = True
        except Exception:  # noqa: BLE001 - a guest that ignores ACPI is stopped the hard way
            pass
        await self.delete(name)
        return {"name": name, "clean": clean}

    # ---- reporting -------------------------------------------------------------------------
    def describe(self, vm: HostVm) -> dict:
        r = vm.record
        return {"name": r.name, "ip": r.ip, "mac": r.mac, "spec": r.spec, "role": r.role,
                "pid": vm.pid, "created_at": r.created_at}

    async def status(self, name: str) -> dict:
        vm = self.get(name)
        return self.describe(vm) | {"runstate": await self.runstate(vm),
                                    "console_errors": self.console_errors(vm)}

    def console_errors(self, vm: HostVm) -> int:
        try:
            text = Path(vm.record.launch_spec.console_log).read_text(errors="replace")
        except OSError:
            return 0
        return len(MEMLOAD_ERROR.findall(text))

    def console_tail(self, name: str, lines: int = 50) -> str:
        vm = self.get(name)
        try:
            text = Path(vm.record.launch_spec.console_log).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def guest_status(self, name: str) -> dict:
        """The guest's own HTTP status page, fetched over its network from this host."""
        vm = self.get(name)
        async with httpx.AsyncClient(timeout=3.0) as client:
            try:
                reply = await client.get(f"http://{vm.record.ip}/cgi-bin/status")
                reply.raise_for_status()
                return reply.json()
            except (httpx.HTTPError, ValueError) as exc:
                return {"error": f"guest status page unreachable: {exc.__class__.__name__}: {exc}"}

"""The agent's HTTP API, called by the controller."""
from __future__ import annotations

import base64
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

import asyncio
import json
import os

from ferry.agent.health import inject, read_health
from ferry.agent.inventory import cpu_model, qemu_version, software_versions
from ferry.agent.settings import AgentSettings
from ferry.agent.vms import VmManager
from ferry.model import Conflict, FerryError, InstanceSpec, InvalidInput, parse_workload
from ferry.qemu.migration import MigrationSettings


class VmBody(BaseModel):
    name: str
    ip: str
    mac: str
    memory_mib: int = Field(gt=0)
    vcpus: int = Field(gt=0)
    workload: str = "idle"
    start_paused: bool = False
    source_dn: str | None = None      # incoming only: the TLS identity the stream must come from
    setup: dict | None = None         # incoming only: the target's capabilities/parameters of the policy

    def spec(self) -> InstanceSpec:
        return InstanceSpec(self.memory_mib, self.vcpus, parse_workload(self.workload))


class MaintenanceEventBody(BaseModel):
    value: str = Field(pattern="^(NONE|MIGRATE_ON_HOST_MAINTENANCE|TERMINATE_ON_HOST_MAINTENANCE)$")
    upcoming: dict | None = None


class ApplyBody(BaseModel):
    versions: dict[str, str] = Field(default_factory=dict)


class SignalBody(BaseModel):
    ecc: int | None = Field(None, ge=0)
    disk: str | None = Field(None, pattern="^(PASSED|FAILED|FAILING)$")


class ResumeBody(BaseModel):
    uri: str = Field(pattern="^tcp:")


class ActionBody(BaseModel):
    kind: str = Field(pattern="^(set-downtime|set-bandwidth|throttle|postcopy|abort)$")
    params: dict = Field(default_factory=dict)
    reason: str = ""


class ForwardingBody(BaseModel):
    action: str = Field(pattern="^(accept|start|stop|stop-accepting)$")
    peer_underlay: str | None = None


class MigrateBody(BaseModel):
    uri: str
    max_bandwidth_mib_s: int = Field(1024, gt=0)
    downtime_limit_ms: int = Field(50, gt=0)
    capabilities: dict[str, bool] = Field(default_factory=lambda: {"events": True})
    forward_to: str | None = None
    tls_hostname: str | None = None
    setup: dict | None = None         # the source's capabilities/parameters of the convergence policy


def create_app(settings: AgentSettings) -> FastAPI:
    manager = VmManager(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.restore()
        yield
        await manager.close()

    app = FastAPI(title=f"ferry agent {settings.name}", lifespan=lifespan)
    app.state.manager = manager

    @app.exception_handler(FerryError)
    async def ferry_error(request: Request, exc: FerryError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/healthz")
    async def healthz():
        return {"ok": True, "host": settings.name}

    @app.get("/v1/inventory")
    async def inventory():
        used = manager.used_memory_mib()
        return {
            "name": settings.name,
            "underlay_ip": settings.underlay_ip,
            "memory_mib": settings.memory_mib,
            "vcpus": settings.vcpus,
            "free_memory_mib": settings.memory_mib - used,
            "accel": settings.accel,
            "qemu_version": qemu_version(settings.qemu_binary),
            "cpu_model": cpu_model(),
            "versions": software_versions(settings.versions_file, settings.qemu_binary),
            "labels": settings.labels,
            "health": read_health(settings.edac_dir, settings.smart_file),
            "vms": sorted(manager.vms),
            "reported_at": time.time(),
        }

    @app.get("/v1/vms")
    async def list_vms():
        return [manager.describe(v) for v in manager.vms.values()]

    @app.post("/v1/vms", status_code=201)
    async def create_vm(body: VmBody):
        return await manager.create(body.name, body.ip, body.mac, body.spec())

    @app.get("/v1/vms/{name}")
    async def vm_status(name: str):
        return await manager.status(name)

    @app.delete("/v1/vms/{name}")
    async def delete_vm(name: str):
        await manager.delete(name)
        return {"deleted": name}

    @app.get("/v1/vms/{name}/guest")
    async def guest_status(name: str):
        return await manager.guest_status(name)

    @app.get("/v1/vms/{name}/console", response_class=PlainTextResponse)
    async def console(name: str, lines: int = 50):
        return manager.console_tail(name, lines)

    @app.get("/v1/vms/{name}/events")
    async def events(name: str):
        return [e.to_dict() for e in manager.get(name).qmp.events]

    @app.post("/v1/incoming", status_code=201)
    async def incoming(body: VmBody):
        return await manager.prepare_incoming(body.name, body.ip, body.mac, body.spec(), body.start_paused,
                                              body.source_dn, body.setup)

    @app.post("/v1/vms/{name}/migrate")
    async def migrate(name: str, body: MigrateBody):
        settings_ = MigrationSettings(body.max_bandwidth_mib_s, body.downtime_limit_ms, body.capabilities)
        return await manager.start_migration(name, body.uri, settings_, body.forward_to, body.tls_hostname,
                                             body.setup)

    @app.post("/v1/vms/{name}/migration-action")
    async def migration_action(name: str, body: ActionBody):
        return await manager.migration_action(name, body.model_dump())

    @app.post("/v1/vms/{name}/postcopy-pause")
    async def postcopy_pause(name: str):
        return await manager.postcopy_pause(name)

    @app.post("/v1/vms/{name}/postcopy-recover")
    async def postcopy_recover(name: str):
        return await manager.postcopy_recover(name)

    @app.post("/v1/vms/{name}/postcopy-resume")
    async def postcopy_resume(name: str, body: ResumeBody):
        return await manager.postcopy_resume(name, body.uri)

    @app.post("/v1/vms/{name}/dirty-rate")
    async def dirty_rate(name: str):
        return await manager.dirty_rate(name)

    @app.get("/v1/vms/{name}/migration")
    async def migration(name: str, since: float = 0.0):
        return await manager.migration_status(name, since)

    @app.post("/v1/vms/{name}/migrate-cancel")
    async def migrate_cancel(name: str):
        return await manager.cancel_migration(name)

    @app.post("/v1/vms/{name}/resume")
    async def resume(name: str):
        return await manager.resume(name)

    @app.post("/v1/vms/{name}/activate")
    async def activate(name: str):
        return await manager.activate(name)

    @app.get("/v1/vms/{name}/route")
    async def route(name: str):
        return await manager.route(name)

    @app.post("/v1/vms/{name}/forwarding")
    async def forwarding_(name: str, body: ForwardingBody):
        if body.action in ("accept", "start") and not body.peer_underlay:
            raise InvalidInput(f"forwarding {body.action} needs peer_underlay")
        return await manager.forwarding(name, body.action, body.peer_underlay)

    @app.get("/v1/vms/{name}/page-digests")
    async def page_digests(name: str):
        digests = await manager.page_digests(name)
        return {"digest_bytes": 8, "pages": len(digests) // 8, "digests": base64.b64encode(digests).decode()}

    @app.post("/v1/vms/{name}/maintenance-event")
    async def maintenance_event(name: str, body: MaintenanceEventBody):
        return await manager.set_maintenance_event(name, body.value, body.upcoming)

    @app.post("/v1/vms/{name}/shutdown")
    async def shutdown(name: str):
        return await manager.shutdown(name)

    @app.post("/v1/maintenance/apply")
    async def apply_maintenance(body: ApplyBody):
        """The host's maintenance action. A real host runs its hook; a lab host rewrites its versions."""
        if manager.vms:
            raise Conflict(f"host {settings.name} still runs VMs ({', '.join(sorted(manager.vms))}); drain it first")
        if settings.maintenance_hook:
            proc = await asyncio.create_subprocess_shell(
                settings.maintenance_hook, env={**os.environ, "FERRY_HOST": settings.name,
                                                "FERRY_VERSIONS": json.dumps(body.versions)})
            if await proc.wait() != 0:
                raise FerryError(f"maintenance hook of {settings.name} exited with {proc.returncode}")
        if settings.lab_signals and settings.versions_file:
            current = json.loads(settings.versions_file.read_text()) if settings.versions_file.exists() else {}
            settings.versions_file.write_text(json.dumps({**current, **body.versions}))
            inject(settings.edac_dir, settings.smart_file, ecc=0, disk="PASSED")   # the repair
        return {"versions": software_versions(settings.versions_file, settings.qemu_binary)}

    @app.post("/v1/health/inject")
    async def inject_signal(body: SignalBody):
        if not settings.lab_signals:
            raise FerryError(f"host {settings.name} is not a lab host; its health signals are real")
        inject(settings.edac_dir, settings.smart_file, body.ecc, body.disk)
        return read_health(settings.edac_dir, settings.smart_file)

    return app

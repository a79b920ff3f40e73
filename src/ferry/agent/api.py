"""The agent's HTTP API, called by the controller."""
from __future__ import annotations

import base64
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from ferry.agent.inventory import cpu_model, qemu_version, software_versions
from ferry.agent.settings import AgentSettings
from ferry.agent.vms import VmManager
from ferry.model import FerryError, InstanceSpec, parse_workload
from ferry.qemu.migration import MigrationSettings


class VmBody(BaseModel):
    name: str
    ip: str
    mac: str
    memory_mib: int = Field(gt=0)
    vcpus: int = Field(gt=0)
    workload: str = "idle"
    start_paused: bool = False

    def spec(self) -> InstanceSpec:
        return InstanceSpec(self.memory_mib, self.vcpus, parse_workload(self.workload))


class MigrateBody(BaseModel):
    uri: str
    max_bandwidth_mib_s: int = Field(1024, gt=0)
    downtime_limit_ms: int = Field(50, gt=0)
    capabilities: dict[str, bool] = Field(default_factory=lambda: {"events": True})


def create_app(settings: AgentSettings) -> FastAPI:
    manager = VmManager(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.restore()
        yield
        await manager.shutdown()

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
        return await manager.prepare_incoming(body.name, body.ip, body.mac, body.spec(), body.start_paused)

    @app.post("/v1/vms/{name}/migrate")
    async def migrate(name: str, body: MigrateBody):
        settings_ = MigrationSettings(body.max_bandwidth_mib_s, body.downtime_limit_ms, body.capabilities)
        return await manager.start_migration(name, body.uri, settings_)

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

    @app.get("/v1/vms/{name}/page-digests")
    async def page_digests(name: str):
        digests = await manager.page_digests(name)
        return {"digest_bytes": 8, "pages": len(digests) // 8, "digests": base64.b64encode(digests).decode()}

    return app

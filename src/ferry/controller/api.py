"""The controller's REST API (FastAPI; the OpenAPI schema is served at /openapi.json)."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ferry.controller.maintenance import MaintenanceEngine
from ferry.controller.service import Controller
from ferry.model import EventSource, FerryError, InvalidInput, Urgency


class HostBody(BaseModel):
    name: str
    agent_url: str
    labels: dict[str, str] = Field(default_factory=dict)


class VmBody(BaseModel):
    name: str
    memory_mib: int = 512
    vcpus: int = 1
    workload: str = "idle"
    host: str | None = None
    on_host_maintenance: str = Field("migrate", pattern="^(migrate|terminate)$")
    migration_policy: str | None = None


class MigrationBody(BaseModel):
    vm: str
    target: str | None = None
    verify_memory: bool = False
    tls: bool | None = None          # default: the controller's migration policy
    policy: str | None = None        # convergence policy (the VM's own choice still wins)


class MaintenanceBody(BaseModel):
    hosts: list[str] = Field(min_length=1)
    at: float | None = Field(None, description="not before this time (seconds since the epoch)")
    reason: str = "scheduled by operator"
    migration_policy: str | None = None


class SignalBody(BaseModel):
    ecc: int | None = Field(None, ge=0)
    disk: str | None = Field(None, pattern="^(PASSED|FAILED|FAILING)$")


def create_app(controller: Controller, engine: MaintenanceEngine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await controller.recover()
        engine.start()
        yield
        await engine.stop()
        await controller.close()

    app = FastAPI(title="ferry controller", lifespan=lifespan)

    @app.exception_handler(FerryError)
    async def ferry_error(request: Request, exc: FerryError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": f"malformed request: {where}: {first.get('msg', 'invalid')}",
                             "errors": jsonable(exc.errors())}, status_code=422)

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/v1/hosts")
    async def list_hosts():
        return controller.host_summaries()

    @app.post("/v1/hosts", status_code=201)
    async def add_host(body: HostBody):
        return (await controller.add_host(body.name, body.agent_url, body.labels)).to_dict()

    @app.get("/v1/hosts/{name}")
    async def show_host(name: str):
        return await controller.host_detail(name)

    @app.get("/v1/vms")
    async def list_vms():
        return [i.to_dict() for i in controller.store.list_instances()]

    @app.post("/v1/vms", status_code=201)
    async def create_vm(body: VmBody):
        inst = await controller.create_vm(body.name, body.memory_mib, body.vcpus, body.workload, body.host,
                                          body.on_host_maintenance, body.migration_policy)
        return inst.to_dict()

    @app.get("/v1/vms/{name}")
    async def show_vm(name: str):
        return await controller.vm_detail(name)

    @app.delete("/v1/vms/{name}")
    async def delete_vm(name: str):
        await controller.delete_vm(name)
        return {"deleted": name}

    @app.get("/v1/migrations")
    async def list_migrations(vm: str | None = None):
        return [m.to_dict() for m in controller.store.list_migrations(vm)]

    @app.post("/v1/migrations", status_code=201)
    async def start_migration(body: MigrationBody):
        return (await controller.start_migration(body.vm, body.target, body.verify_memory, tls=body.tls,
                                                 policy=body.policy)).to_dict()

    @app.get("/v1/policies")
    async def policies():
        return {name: p.to_dict() for name, p in controller.migrator.policies.items()}

    @app.get("/v1/migrations/{migration_id}")
    async def show_migration(migration_id: str):
        return controller.migration(migration_id).to_dict()

    @app.post("/v1/hosts/{name}/drain", status_code=201)
    async def drain_host(name: str):
        engine.check_drainable(name)
        return engine.new_event(EventSource.OPERATOR, [name], "drain by operator", Urgency.PLANNED,
                                action="drain").to_dict()

    @app.post("/v1/hosts/{name}/undrain")
    async def undrain_host(name: str):
        await engine.undrain(name)
        return controller.host(name).to_dict()

    @app.post("/v1/hosts/{name}/signal")
    async def signal_host(name: str, body: SignalBody):
        if body.ecc is None and body.disk is None:
            raise InvalidInput("a signal needs ecc=N and/or disk=PASSED|FAILED")
        reply = await controller.agent_for(name).inject_signal(body.model_dump())
        engine.wake()
        return reply

    @app.get("/v1/maintenance")
    async def list_maintenance():
        return [e.to_dict() for e in controller.store.list_events()]

    @app.post("/v1/maintenance", status_code=201)
    async def schedule_maintenance(body: MaintenanceBody):
        if body.at is None:
            for name in body.hosts:
                engine.check_drainable(name)
        if body.migration_policy and body.migration_policy not in controller.migrator.policies:
            raise InvalidInput(f"unknown convergence policy {body.migration_policy!r}")
        return engine.new_event(EventSource.OPERATOR, body.hosts, body.reason, Urgency.PLANNED,
                                not_before=body.at or 0.0, migration_policy=body.migration_policy).to_dict()

    @app.get("/v1/maintenance/{event_id}")
    async def show_maintenance(event_id: str):
        return engine.event(event_id).to_dict()

    @app.post("/v1/maintenance/{event_id}/cancel")
    async def cancel_maintenance(event_id: str):
        return (await engine.cancel(event_id)).to_dict()

    @app.get("/v1/manifest")
    async def manifest():
        return engine.status()

    return app


def jsonable(errors: list) -> list:
    return [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]

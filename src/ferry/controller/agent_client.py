"""The controller's client of host agents (HTTP over TCP, or a unix socket in the lab)."""
from __future__ import annotations

import base64
import ssl

import httpx

from ferry.model import FerryError


class AgentError(FerryError):
    status = 502


def http_client(url: str, host: str, tls: ssl.SSLContext | None = None, timeout: float = 30.0) -> httpx.AsyncClient:
    """`unix:/path/agent.sock` or `http(s)://host:port`. With a fleet TLS context the agent must
    present the certificate of `host` (over a socket, the URL's host is what TLS checks)."""
    if url.startswith("unix:"):
        transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix:"), verify=tls or True)
        base = f"https://{host}" if tls else "http://agent"
        return httpx.AsyncClient(transport=transport, base_url=base, timeout=timeout)
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(verify=tls or True), base_url=url, timeout=timeout)


class AgentClient:
    def __init__(self, host: str, url: str, tls: ssl.SSLContext | None = None):
        self.host = host
        self.url = url
        self._http = http_client(url, host, tls)

    async def _call(self, method: str, path: str, **kw) -> dict | list:
        try:
            reply = await self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise AgentError(f"agent of host {self.host} unreachable at {self.url}: {exc.__class__.__name__}") from exc
        if reply.status_code >= 400:
            try:
                detail = reply.json().get("detail")
            except ValueError:
                detail = reply.text
            raise AgentError(f"agent of host {self.host}: {detail}")
        return reply.json()

    async def inventory(self) -> dict:
        return await self._call("GET", "/v1/inventory")

    async def create_vm(self, body: dict) -> dict:
        return await self._call("POST", "/v1/vms", json=body, timeout=60)

    async def delete_vm(self, name: str) -> dict:
        return await self._call("DELETE", f"/v1/vms/{name}")

    async def vm_status(self, name: str) -> dict:
        return await self._call("GET", f"/v1/vms/{name}")

    async def list_vms(self) -> list:
        return await self._call("GET", "/v1/vms")

    async def guest_status(self, name: str) -> dict:
        return await self._call("GET", f"/v1/vms/{name}/guest")

    async def prepare_incoming(self, body: dict) -> dict:
        return await self._call("POST", "/v1/incoming", json=body, timeout=60)

    async def migrate(self, name: str, body: dict) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/migrate", json=body)

    async def migration_status(self, name: str, since: float = 0.0) -> dict:
        return await self._call("GET", f"/v1/vms/{name}/migration", params={"since": since})

    async def cancel_migration(self, name: str) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/migrate-cancel")

    async def resume(self, name: str) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/resume")

    async def activate(self, name: str) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/activate")

    async def migration_action(self, name: str, action: dict) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/migration-action", json=action)

    async def postcopy_pause(self, name: str) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/postcopy-pause")

    async def postcopy_recover(self, name: str) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/postcopy-recover")

    async def postcopy_resume(self, name: str, uri: str) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/postcopy-resume", json={"uri": uri})

    async def dirty_rate(self, name: str) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/dirty-rate", timeout=30)

    async def route(self, name: str) -> dict:
        return await self._call("GET", f"/v1/vms/{name}/route")

    async def forwarding(self, name: str, action: str, peer_underlay: str | None = None) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/forwarding",
                                json={"action": action, "peer_underlay": peer_underlay})

    async def page_digests(self, name: str) -> bytes:
        reply = await self._call("GET", f"/v1/vms/{name}/page-digests", timeout=300)
        return base64.b64decode(reply["digests"])

    async def set_maintenance_event(self, name: str, value: str, upcoming: dict | None = None) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/maintenance-event", json={"value": value, "upcoming": upcoming})

    async def shutdown_vm(self, name: str) -> dict:
        return await self._call("POST", f"/v1/vms/{name}/shutdown", timeout=90)

    async def apply_maintenance(self, versions: dict[str, str]) -> dict:
        return await self._call("POST", "/v1/maintenance/apply", json={"versions": versions}, timeout=600)

    async def inject_signal(self, body: dict) -> dict:
        return await self._call("POST", "/v1/health/inject", json=body)

    async def close(self) -> None:
        await self._http.aclose()


class AgentPool:
    """One client per host, made on first use."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.tls = tls
        self._clients: dict[tuple[str, str], AgentClient] = {}

    def get(self, host: str, url: str) -> AgentClient:
        key = (host, url)
        if key not in self._clients:
            self._clients[key] = AgentClient(host, url, self.tls)
        return self._clients[key]

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()

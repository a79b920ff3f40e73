"""A small synchronous client of the controller API for the CLI."""
from __future__ import annotations

import httpx

from ferry.lab.config import controller_url


class ApiError(Exception):
    pass


class ControllerClient:
    def __init__(self, url: str | None = None, timeout: float = 120.0):
        self.url = url or controller_url()
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def call(self, method: str, path: str, **kw):
        try:
            reply = self._http.request(method, path, **kw)
        except httpx.ConnectError:
            raise ApiError(f"no controller at {self.url} (is the lab up? `ferry lab up`)") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"controller at {self.url}: {exc.__class__.__name__}: {exc}") from None
        if reply.status_code >= 400:
            try:
                detail = reply.json().get("detail")
            except ValueError:
                detail = reply.text
            raise ApiError(str(detail))
        return reply.json()

    def get(self, path: str, **kw):
        return self.call("GET", path, **kw)

    def post(self, path: str, body: dict):
        return self.call("POST", path, json=body)

    def delete(self, path: str):
        return self.call("DELETE", path)

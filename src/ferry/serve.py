"""Serving an ASGI app on `unix:/path` or `HOST:PORT` (agents and the controller)."""
from __future__ import annotations

import logging
from pathlib import Path

import uvicorn


def uvicorn_bind(listen: str) -> dict:
    """`unix:/path` or `HOST:PORT` as uvicorn keyword arguments."""
    if listen.startswith("unix:"):
        path = Path(listen.removeprefix("unix:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        return {"uds": str(path)}
    host, _, port = listen.rpartition(":")
    return {"host": host or "127.0.0.1", "port": int(port)}


def serve(app, listen: str, ssl_kwargs: dict | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(app, log_level="warning", **uvicorn_bind(listen), **(ssl_kwargs or {}))

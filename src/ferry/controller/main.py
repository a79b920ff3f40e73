"""`ferry controller`: run the controller's HTTP server over a SQLite store."""
from __future__ import annotations

from pathlib import Path

from ferry.controller.api import create_app
from ferry.controller.policy import MigrationPolicy
from ferry.controller.service import Controller
from ferry.serve import serve
from ferry.store import SqliteStore


def run_controller(db: Path, listen: str, policy: MigrationPolicy | None = None) -> None:
    serve(create_app(Controller(SqliteStore(db), policy)), listen)

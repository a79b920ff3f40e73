"""`ferry controller`: run the controller's HTTP server over a SQLite store."""
from __future__ import annotations

from pathlib import Path

from ferry.controller.api import create_app
from ferry.controller.config import ControllerConfig
from ferry.controller.maintenance import MaintenanceEngine
from ferry.controller.service import Controller
from ferry.serve import serve
from ferry.store import SqliteStore


def run_controller(db: Path, listen: str, config: ControllerConfig) -> None:
    controller = Controller(SqliteStore(db), config.migration)
    serve(create_app(controller, MaintenanceEngine(controller, config)), listen)

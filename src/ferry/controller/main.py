"""`ferry controller`: run the controller's HTTP server over a SQLite store."""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from ferry.controller.api import create_app
from ferry.controller.config import ControllerConfig
from ferry.controller.maintenance import MaintenanceEngine
from ferry.controller.service import Controller
from ferry.serve import serve
from ferry.store import SqliteStore


def run_controller(db: Path, listen: str, config: ControllerConfig) -> None:
    tls, policy, source_dn = None, config.migration, None
    if config.pki_dir is not None:
        from ferry.pki import client_context, validate_identity
        from ferry.pki.qemu_creds import expected_dn
        identity = validate_identity(config.pki_dir, "controller", "controller")
        tls = client_context(identity)
        source_dn = functools.partial(expected_dn, identity.ca_cert)
    else:
        policy = replace(policy, tls=False)      # no fleet PKI, no TLS streams
    controller = Controller(SqliteStore(db), policy, tls, source_dn)
    serve(create_app(controller, MaintenanceEngine(controller, config)), listen)

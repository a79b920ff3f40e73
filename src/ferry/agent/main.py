"""`ferry agent`: run the host agent's HTTP server (HTTPS with client certificates given a fleet PKI)."""
from __future__ import annotations

from ferry.agent.api import create_app
from ferry.agent.settings import AgentSettings
from ferry.serve import serve


def run_agent(settings: AgentSettings, listen: str) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    ssl_kwargs = None
    if settings.pki_dir is not None:
        from ferry.pki import qemu_creds_dir, uvicorn_ssl_kwargs, validate_identity
        # Checked at start-up, so a bad certificate is one clear line now, not a mystery at migration time.
        identity = validate_identity(settings.pki_dir, settings.name, "host")
        qemu_creds_dir(identity, settings.name, settings.qemu_tls_dir)
        ssl_kwargs = uvicorn_ssl_kwargs(identity)
    serve(create_app(settings), listen, ssl_kwargs)

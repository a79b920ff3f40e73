"""`ferry agent`: run the host agent's HTTP server."""
from __future__ import annotations

from ferry.agent.api import create_app
from ferry.agent.settings import AgentSettings
from ferry.serve import serve


def run_agent(settings: AgentSettings, listen: str) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    serve(create_app(settings), listen)

"""Plain functions behind `ferry pki ...` (the Typer wiring lives in `ferry.cli`).

Each returns the paths it wrote, for printing; errors are `PkiError` with a
one-line message.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ferry.pki.ca import CaPaths, IssuedPaths, init_ca, issue
from ferry.pki.validate import Identity, validate_identity

__all__ = ["pki_init", "pki_issue", "pki_check"]


def pki_init(pki_dir: Path, fleet: str = "ferry", force: bool = False, days: int = 3650) -> CaPaths:
    """`ferry pki init`: create the fleet CA (refuses to replace one unless `force`)."""
    return init_ca(Path(pki_dir), fleet=fleet, days=days, force=force)


def pki_issue(pki_dir: Path, name: str, kind: str = "host", sans: Iterable[str] = (),
              days: int = 825, force: bool = False) -> IssuedPaths:
    """`ferry pki issue NAME --kind host --san 10.201.1.2`: issue a key and certificate."""
    return issue(Path(pki_dir), name, kind, days=days, sans=list(sans), force=force)  # type: ignore[arg-type]


def pki_check(pki_dir: Path, name: str, kind: str | None = None) -> Identity:
    """`ferry pki check NAME`: run the start-up checks an agent/controller would run."""
    return validate_identity(Path(pki_dir), name, kind)

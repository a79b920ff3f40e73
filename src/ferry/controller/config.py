"""Controller settings, read from an optional TOML file (`ferry controller --config`)."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from ferry.controller.planner import PlannerPolicy
from ferry.controller.policy import MigrationPolicy
from ferry.model import InvalidInput


@dataclass(frozen=True)
class HealthPolicy:
    ecc_threshold: int = 10                  # corrected memory errors that make a host's failure likely
    failing_disk_states: tuple[str, ...] = ("FAILED", "FAILING")


@dataclass(frozen=True)
class ControllerConfig:
    manifest: Path | None = None
    planner: PlannerPolicy = field(default_factory=PlannerPolicy)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    migration: MigrationPolicy = field(default_factory=MigrationPolicy)
    tick_s: float = 1.0                      # how often the reconciler looks at the fleet
    pki_dir: Path | None = None              # fleet PKI: mutual TLS to agents and on migration streams


def _section(cls, doc: dict, name: str):
    values = doc.get(name, {})
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise InvalidInput(f"controller config [{name}] has unknown keys: {', '.join(sorted(unknown))}")
    if "failing_disk_states" in values:
        values = {**values, "failing_disk_states": tuple(values["failing_disk_states"])}
    return cls(**values)


def load_config(path: Path | None, manifest: Path | None = None, pki_dir: Path | None = None) -> ControllerConfig:
    doc: dict = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"controller config {path}: {exc}") from None
    unknown = set(doc) - {"planner", "health", "migration", "controller"}
    if unknown:
        raise InvalidInput(f"controller config has unknown sections: {', '.join(sorted(unknown))}")
    ctl = doc.get("controller", {})
    return ControllerConfig(
        manifest=manifest or (Path(ctl["manifest"]) if "manifest" in ctl else None),
        planner=_section(PlannerPolicy, doc, "planner"),
        health=_section(HealthPolicy, doc, "health"),
        migration=_section(MigrationPolicy, doc, "migration"),
        tick_s=float(ctl.get("tick_s", 1.0)),
        pki_dir=pki_dir or (Path(ctl["pki_dir"]) if "pki_dir" in ctl else None),
    )

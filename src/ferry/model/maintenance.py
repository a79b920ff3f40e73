"""Maintenance events: why hosts must be emptied, and how far each drain has got."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class EventSource(str, Enum):
    MANIFEST = "manifest"     # the fleet manifest asks for other software versions
    OPERATOR = "operator"     # `ferry maintenance schedule` / `ferry host drain`
    HARDWARE = "hardware"     # a host's health signal crossed a threshold


class Urgency(str, Enum):
    URGENT = "urgent"         # hardware: served before any planned work
    PLANNED = "planned"


class EventState(str, Enum):
    PENDING = "pending"       # waiting for its time, or for room under the planner's limits
    RUNNING = "running"       # at least one of its hosts is draining or in maintenance
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


class HostProgress(str, Enum):
    WAITING = "waiting"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"
    DONE = "done"
    CANCELLED = "cancelled"


OPEN_STATES = frozenset({EventState.PENDING, EventState.RUNNING})


@dataclass
class MaintenanceEvent:
    id: str
    source: EventSource
    hosts: list[str]
    reason: str
    urgency: Urgency = Urgency.PLANNED
    state: EventState = EventState.PENDING
    created_at: float = 0.0
    not_before: float = 0.0                 # operator's --at
    started_at: float | None = None
    finished_at: float | None = None
    action: str = "maintain"                # "maintain": run the maintenance action and return to service;
                                            # "drain": empty the host and leave it in maintenance
    desired_versions: dict[str, dict[str, str]] = field(default_factory=dict)  # host -> versions (manifest)
    progress: dict[str, str] = field(default_factory=dict)      # host -> HostProgress
    notices: dict[str, float] = field(default_factory=dict)     # vm -> when its guest was told
    blocked: str | None = None              # why the planner could not start it (yet)
    migration_policy: str | None = None     # convergence policy for its moves (a VM's own choice wins)
    log: list[tuple[float, str]] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES

    def note(self, at: float, text: str) -> None:
        self.log.append((at, text))
        del self.log[:-200]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(source=self.source.value, urgency=self.urgency.value, state=self.state.value,
                 log=[list(x) for x in self.log])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MaintenanceEvent":
        return cls(**{**d, "source": EventSource(d["source"]), "urgency": Urgency(d["urgency"]),
                      "state": EventState(d["state"]), "log": [(float(a), str(b)) for a, b in d.get("log", [])]})

"""A virtual machine (instance) and its placement."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import Enum

from ferry.model.errors import InvalidInput
from ferry.model.workload import Workload, parse_workload

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")


def validate_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name or ""):
        raise InvalidInput(
            f"invalid {what} {name!r}: use 2-32 lowercase letters, digits and dashes, starting with a letter"
        )
    return name


class InstanceState(str, Enum):
    CREATING = "creating"
    RUNNING = "running"
    MIGRATING = "migrating"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass(frozen=True)
class InstanceSpec:
    memory_mib: int = 512
    vcpus: int = 1
    workload: Workload = field(default_factory=Workload)
    on_host_maintenance: str = "migrate"   # GCE's scheduling option: "migrate" or "terminate"
    migration_policy: str | None = None    # a named convergence policy (e.g. no-postcopy); None: the default

    def to_dict(self) -> dict:
        return {"memory_mib": self.memory_mib, "vcpus": self.vcpus, "workload": str(self.workload),
                "on_host_maintenance": self.on_host_maintenance, "migration_policy": self.migration_policy}

    @classmethod
    def from_dict(cls, d: dict) -> "InstanceSpec":
        return cls(int(d["memory_mib"]), int(d["vcpus"]), parse_workload(d.get("workload")),
                   d.get("on_host_maintenance", "migrate"), d.get("migration_policy"))


@dataclass
class Instance:
    name: str
    spec: InstanceSpec
    ip: str
    mac: str
    host: str | None = None
    state: InstanceState = InstanceState.CREATING
    created_at: float = 0.0
    error: str | None = None
    migrations: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Instance":
        return cls(**{**d, "spec": InstanceSpec.from_dict(d["spec"]), "state": InstanceState(d["state"])})


def validate_spec(spec: InstanceSpec) -> None:
    from ferry.model.workload import validate_workload_fits

    if not 128 <= spec.memory_mib <= 65536:
        raise InvalidInput(f"memory {spec.memory_mib} MiB out of range (128..65536)")
    if not 1 <= spec.vcpus <= 64:
        raise InvalidInput(f"vcpus {spec.vcpus} out of range (1..64)")
    validate_workload_fits(spec.workload, spec.memory_mib)
    if spec.on_host_maintenance not in ("migrate", "terminate"):
        raise InvalidInput(f"on_host_maintenance must be migrate or terminate, not {spec.on_host_maintenance!r}")

"""A host of the fleet, as the controller knows it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class HostState(str, Enum):
    ACTIVE = "active"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"
    FAILED = "failed"


@dataclass
class Host:
    name: str
    agent_url: str              # how the controller reaches the agent (http://… or unix:/path)
    underlay_ip: str            # the address migration streams and forwarding use
    memory_mib: int             # capacity offered to VMs
    vcpus: int
    state: HostState = HostState.ACTIVE
    labels: dict[str, str] = field(default_factory=dict)
    inventory: dict = field(default_factory=dict)   # last report of the agent (versions, CPU, QEMU)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Host":
        return cls(**{**d, "state": HostState(d.get("state", "active"))})

"""A live migration: its phases, their wall-clock timestamps, and what was measured.

The phase order follows the design: pending -> target-ready -> connected ->
precopy (pre-migration brownout) -> blackout -> postmigration (post-migration
brownout, the source still supports the VM) -> completed; or aborted (rolled
back, the VM still runs on its source) or failed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class Phase(str, Enum):
    PENDING = "pending"
    NOTIFIED = "notified"
    TARGET_READY = "target-ready"
    CONNECTED = "connected"
    PRECOPY = "precopy"
    BLACKOUT = "blackout"
    POSTCOPY = "postcopy"
    VERIFYING = "verifying"
    POSTMIGRATION = "postmigration"      # the VM runs on the target; the source still supports it
    FORWARDING = "forwarding"            # the source tunnels the VM's packets to the target
    FABRIC_UPDATED = "fabric-updated"    # the fabric routes the VM's address to the target
    SOURCE_CLEANUP = "source-cleanup"    # forwarding removed: end of post-migration brownout
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"


TERMINAL_PHASES = frozenset({Phase.COMPLETED, Phase.ABORTED, Phase.FAILED})


@dataclass
class MigrationStats:
    """Measurements of one migration; times in seconds or milliseconds as named."""

    precopy_s: float | None = None           # pre-migration brownout: migrate command -> source STOP
    blackout_ms: float | None = None         # source STOP event -> target RESUME event
    qemu_downtime_ms: float | None = None    # QEMU's own figure, beside ours
    verify_ms: float | None = None           # memory comparison inside blackout (verification mode only)
    postmigration_s: float | None = None     # post-migration brownout: target RESUME -> forwarding removed
    fabric_update_s: float | None = None     # target RESUME -> the fabric routes the VM to the target
    forwarded_packets: int | None = None     # packets the source tunnelled to the target meanwhile
    total_s: float | None = None
    bytes_transferred: int | None = None
    ram_total_bytes: int | None = None
    dirty_sync_count: int | None = None
    dirty_pages_rate: int | None = None      # pages/s, last seen by QEMU
    max_dirty_rate_mib_s: float | None = None
    mbps: float | None = None
    setup_ms: float | None = None
    pages_compared: int | None = None
    pages_different: int | None = None
    postcopy_s: float | None = None          # post-copy phase: switch -> completed
    postcopy_blocktime_ms: float | None = None   # target vCPUs waiting for pages; the guest's stall = blackout + this
    dirty_rate_measured_mib_s: float | None = None  # calc-dirty-rate before the migration
    postcopy_recoveries: int | None = None   # times a broken post-copy link was paused and recovered

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Migration:
    id: str
    vm: str
    source: str
    target: str
    phase: Phase = Phase.PENDING
    # Ordered list of (phase, wall-clock time entered) pairs.
    timeline: list[tuple[str, float]] = field(default_factory=list)
    stats: MigrationStats = field(default_factory=MigrationStats)
    progress: dict = field(default_factory=dict)   # the latest query-migrate sample
    verify_memory: bool = False
    tls: bool = False                    # mutual TLS on the stream, accepted only from the named source
    policy: str = ""                     # the convergence policy, and why it was chosen
    policy_reason: str = ""
    prediction: dict = field(default_factory=dict)      # before the migration, beside the outcome in `stats`
    decisions: list[dict] = field(default_factory=list)  # the monitor loop's log: every action with its reason
    reason: str = "operator"
    error: str | None = None
    created_at: float = 0.0
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def enter(self, phase: Phase, at: float) -> None:
        self.phase = phase
        self.timeline.append((phase.value, at))

    def entered_at(self, phase: Phase) -> float | None:
        for name, at in self.timeline:
            if name == phase.value:
                return at
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["phase"] = self.phase.value
        d["timeline"] = [list(t) for t in self.timeline]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Migration":
        return cls(**{
            **d,
            "phase": Phase(d["phase"]),
            "timeline": [(p, float(t)) for p, t in d.get("timeline", [])],
            "stats": MigrationStats(**d.get("stats", {})),
        })

"""Migration policy for the monitor loop: settings and pure decisions over samples."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class MigrationPolicy:
    max_bandwidth_mib_s: int = 1024       # QEMU's default of 128 MiB/s cannot outrun a busy guest
    downtime_limit_ms: int = 50
    poll_interval_s: float = 0.2
    timeout_base_s: float = 30.0          # completion timeout = base + per_gib x guest GiB
    timeout_per_gib_s: float = 60.0
    no_progress_timeout_s: float = 30.0   # abort if `remaining` has not hit a new low for this long
    tls: bool = True                      # migration streams use the fleet PKI (when the controller has one)
    forwarding: bool = True               # the source tunnels the VM's packets until the fabric has moved
    forwarding_grace_s: float = 0.5       # kept after the fabric has moved, for packets in flight
    fabric_timeout_s: float = 60.0        # longest wait for the fabric to route the VM to its target

    def completion_timeout_s(self, memory_mib: int) -> float:
        return self.timeout_base_s + self.timeout_per_gib_s * memory_mib / 1024

    def agent_settings(self) -> dict:
        return {"max_bandwidth_mib_s": self.max_bandwidth_mib_s, "downtime_limit_ms": self.downtime_limit_ms,
                "capabilities": {"events": True}}


class Verdict(str, Enum):
    CONTINUE = "continue"
    ABORT = "abort"


@dataclass
class Progress:
    """What the monitor loop remembers between samples."""

    started: float
    best_remaining: int | None = None
    best_at: float | None = None


def judge(policy: MigrationPolicy, progress: Progress, now: float, remaining: int, memory_mib: int) -> tuple[Verdict, str]:
    """Keep going, or abort with a reason (timeouts end a migration; nothing runs forever)."""
    if progress.best_remaining is None or remaining < progress.best_remaining:
        progress.best_remaining, progress.best_at = remaining, now
    elapsed = now - progress.started
    limit = policy.completion_timeout_s(memory_mib)
    if elapsed > limit:
        return Verdict.ABORT, f"did not complete within {limit:.0f} s"
    if progress.best_at is not None and now - progress.best_at > policy.no_progress_timeout_s:
        return Verdict.ABORT, f"no progress for {policy.no_progress_timeout_s:.0f} s (remaining stuck at {remaining} bytes)"
    return Verdict.CONTINUE, ""

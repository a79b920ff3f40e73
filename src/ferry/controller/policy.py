"""Migration settings of the controller that are not the convergence policy's (see convergence.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MigrationPolicy:
    convergence: str = "balanced"         # the default named convergence policy
    policies_file: str | None = None      # TOML with more named policies (see docs/convergence.md)
    link_bandwidth_mib_s: float = 400.0   # assumed until migrations have measured the link
    tls: bool = True                      # migration streams use the fleet PKI (when the controller has one)
    forwarding: bool = True               # the source tunnels the VM's packets until the fabric has moved
    forwarding_grace_s: float = 0.5       # kept after the fabric has moved, for packets in flight
    fabric_timeout_s: float = 60.0        # longest wait for the fabric to route the VM to its target
    postcopy_stall_s: float = 3.0         # post-copy sent nothing for this long: pause it, then recover
    postcopy_recovery_s: float = 600.0    # keep trying to recover a paused post-copy this long

"""Migration parameters, capabilities and the `query-migrate` sampler.

Parsing and decisions are pure; `apply_*` and `sample` talk QMP.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ferry.qemu.session import QmpSession

MIB = 1024 * 1024
ACTIVE_STATES = frozenset({"setup", "active", "pre-switchover", "device", "postcopy-active",
                           "postcopy-paused", "postcopy-recover", "wait-unplug", "cancelling"})
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class MigrationSettings:
    """What the source (and target) QEMU is told before `migrate`."""

    max_bandwidth_mib_s: int = 1024        # QEMU's default is 128 MiB/s, too slow for a busy guest
    downtime_limit_ms: int = 50
    capabilities: dict[str, bool] = field(default_factory=lambda: {"events": True})

    def parameters(self) -> dict:
        return {
            "max-bandwidth": self.max_bandwidth_mib_s * MIB,
            "downtime-limit": self.downtime_limit_ms,
        }

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MigrationSample:
    """One reading of `query-migrate`, flattened."""

    status: str
    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    dirty_pages_rate: int = 0
    dirty_sync_count: int = 0
    page_size: int = 4096
    mbps: float = 0.0
    error: str | None = None
    postcopy_blocktime_ms: int | None = None   # target only, with the postcopy-blocktime capability

    @property
    def dirty_rate_mib_s(self) -> float:
        return self.dirty_pages_rate * self.page_size / MIB

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATES

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dirty_rate_mib_s"] = round(self.dirty_rate_mib_s, 1)
        return d


def parse_query_migrate(reply: dict) -> MigrationSample:
    ram = reply.get("ram") or {}
    return MigrationSample(
        status=reply.get("status", "none"),
        total_time_ms=reply.get("total-time"),
        setup_time_ms=reply.get("setup-time"),
        downtime_ms=reply.get("downtime"),
        expected_downtime_ms=reply.get("expected-downtime"),
        transferred=ram.get("transferred", 0),
        remaining=ram.get("remaining", 0),
        total=ram.get("total", 0),
        dirty_pages_rate=ram.get("dirty-pages-rate", 0),
        dirty_sync_count=ram.get("dirty-sync-count", 0),
        page_size=ram.get("page-size", 4096) or 4096,
        mbps=float(ram.get("mbps", 0.0)),
        error=reply.get("error-desc"),
        postcopy_blocktime_ms=reply.get("postcopy-blocktime"),
    )


def capabilities_arg(caps: dict[str, bool]) -> list[dict]:
    return [{"capability": k, "state": v} for k, v in sorted(caps.items())]


async def apply_settings(qmp: QmpSession, settings: MigrationSettings) -> None:
    await qmp.execute("migrate-set-capabilities", {"capabilities": capabilities_arg(settings.capabilities)})
    await qmp.execute("migrate-set-parameters", settings.parameters())


async def sample(qmp: QmpSession) -> MigrationSample:
    return parse_query_migrate(await qmp.execute("query-migrate"))


def incoming_port(reply: dict) -> int | None:
    """The port a target listens on, from `query-migrate` after `migrate-incoming tcp:…:0`."""
    for addr in reply.get("socket-address") or []:
        if addr.get("type") in ("inet", "tcp") and addr.get("port"):
            return int(addr["port"])
    return None

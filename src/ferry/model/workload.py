"""The guest workload spec, e.g. ``memload:rate=100,size=256``."""
from __future__ import annotations

from dataclasses import dataclass

from ferry.model.errors import InvalidInput

WORKLOAD_KINDS = ("idle", "memload")


@dataclass(frozen=True)
class Workload:
    kind: str = "idle"
    rate_mib_s: int = 0
    size_mib: int | None = None  # None: half of the guest's memory

    def memload_size(self, memory_mib: int) -> int:
        return self.size_mib if self.size_mib is not None else memory_mib // 2

    def __str__(self) -> str:
        if self.kind == "idle":
            return "idle"
        size = f",size={self.size_mib}" if self.size_mib is not None else ""
        return f"memload:rate={self.rate_mib_s}{size}"


def parse_workload(text: str | None) -> Workload:
    """Parse ``idle`` or ``memload:rate=R[,size=S]`` (MiB/s, MiB)."""
    if text is None or text.strip() in ("", "idle"):
        return Workload()
    kind, _, args = text.strip().partition(":")
    if kind != "memload":
        raise InvalidInput(f"unknown workload kind {kind!r} in {text!r}; expected one of {', '.join(WORKLOAD_KINDS)}")
    values: dict[str, int] = {}
    for item in filter(None, args.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or key not in ("rate", "size"):
            raise InvalidInput(f"malformed workload {text!r}: expected memload:rate=MiB_PER_S[,size=MiB], got {item!r}")
        if key in values:
            raise InvalidInput(f"malformed workload {text!r}: {key} given twice")
        try:
            values[key] = int(raw)
        except ValueError:
            raise InvalidInput(f"malformed workload {text!r}: {key} must be a whole number, got {raw!r}") from None
        if values[key] < 0 or (key == "size" and values[key] == 0):
            raise InvalidInput(f"malformed workload {text!r}: {key} must be positive")
    return Workload("memload", values.get("rate", 0), values.get("size"))


def validate_workload_fits(workload: Workload, memory_mib: int) -> None:
    if workload.kind == "memload" and workload.memload_size(memory_mib) > memory_mib - 96:
        raise InvalidInput(
            f"memload size {workload.memload_size(memory_mib)} MiB leaves too little of the guest's {memory_mib} MiB"
            " for its kernel (keep 96 MiB free)"
        )

"""Health signals of a host: corrected memory errors (EDAC) and disk health (SMART).

Paths are settings, so the lab can point them at files it writes
(`ferry host signal HOST ecc=50`); on a real host they are the kernel's
EDAC counters and a file a SMART monitor keeps current.
"""
from __future__ import annotations

from pathlib import Path


def corrected_memory_errors(edac_dir: Path) -> int:
    total = 0
    for counter in sorted(edac_dir.glob("mc*/ce_count")):
        try:
            total += int(counter.read_text().strip() or 0)
        except (OSError, ValueError):
            continue
    return total


def disk_health(smart_file: Path | None) -> str:
    if smart_file is None:
        return "unknown"
    try:
        return smart_file.read_text().strip().upper() or "unknown"
    except OSError:
        return "unknown"


def read_health(edac_dir: Path, smart_file: Path | None) -> dict:
    return {"ecc_corrected": corrected_memory_errors(edac_dir), "disk": disk_health(smart_file)}


def inject(edac_dir: Path, smart_file: Path | None, ecc: int | None = None, disk: str | None = None) -> None:
    """Lab only: write the counters the agent reads."""
    if ecc is not None:
        path = edac_dir / "mc0" / "ce_count"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{ecc}\n")
    if disk is not None and smart_file is not None:
        smart_file.parent.mkdir(parents=True, exist_ok=True)
        smart_file.write_text(disk.upper() + "\n")

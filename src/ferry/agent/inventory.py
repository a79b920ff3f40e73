"""What a host reports about itself: capacity, free memory, QEMU and CPU, software versions."""
from __future__ import annotations

import json
import platform
import subprocess
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=4)
def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("QEMU emulator version ").split(" ")[0] or "unknown"


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def software_versions(versions_file: Path | None, binary: str) -> dict[str, str]:
    """Versions the host runs; a lab host reads them from a file its maintenance rewrites."""
    versions = {"qemu": qemu_version(binary), "kernel": platform.release()}
    if versions_file and versions_file.exists():
        versions.update({str(k): str(v) for k, v in json.loads(versions_file.read_text()).items()})
    return versions

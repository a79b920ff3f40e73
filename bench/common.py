"""Shared bits of the benchmarks: a private lab, results files."""
from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

from ferry.cli.client import ControllerClient
from ferry.lab.config import LabConfig
from ferry.lab.lab import down, up

RESULTS = Path(__file__).resolve().parent / "results"


def bench_lab(prefix: str, port: int, hosts: int = 2, host_memory: int = 3072, migration: str = "") -> tuple[LabConfig, ControllerClient]:
    cfg = LabConfig(prefix=prefix, state_dir=Path("/tmp/ferry-bench") / prefix, controller=f"http://127.0.0.1:{port}",
                    hosts=hosts, host_memory_mib=host_memory, migration_settings=migration)
    up(cfg, log=lambda m: None)
    return cfg, ControllerClient(cfg.controller)


def follow(api: ControllerClient, m: dict, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while m["phase"] not in ("completed", "aborted", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"migration {m['id']} still {m['phase']}")
        time.sleep(0.2)
        m = api.get(f"/v1/migrations/{m['id']}")
    return m


def machine() -> dict:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"qemu": qemu, "kernel": platform.release(), "cpus": __import__("os").cpu_count(), "accel": "tcg"}


def write(name: str, data: dict, markdown: str) -> Path:
    out = RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=2))
    (out / "results.md").write_text(markdown)
    return out


__all__ = ["bench_lab", "follow", "machine", "write", "down"]

"""A lab fleet for end-to-end tests: real namespaces, agents, controller and QEMU VMs.

It uses its own namespace prefix, state folder and controller port, so it never
touches a lab a developer has running.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.cli.client import ControllerClient
from ferry.lab.config import LabConfig
from ferry.lab.lab import down, up

pytestmark = pytest.mark.e2e


@dataclass
class Lab:
    cfg: LabConfig
    api: ControllerClient

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "FERRY_LAB_PREFIX": self.cfg.prefix, "FERRY_LAB_DIR": str(self.cfg.state_dir),
                "FERRY_CONTROLLER": self.cfg.controller, "COLUMNS": "200"}

    def ferry(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the real `ferry` command line against this lab."""
        result = subprocess.run([sys.executable, "-m", "ferry.cli.main", *args], env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"ferry {' '.join(args)} failed ({result.returncode}): {result.stderr}{result.stdout}")
        return result

    def ferry_json(self, *args: str):
        return json.loads(self.ferry(*args, "--json").stdout)

    def create_vm(self, name: str, memory: int = 512, workload: str = "idle", host: str | None = None) -> dict:
        args = ["vm", "create", name, "--memory", str(memory), "--workload", workload]
        if host:
            args += ["--host", host]
        return self.ferry_json(*args)

    def guest(self, name: str) -> dict:
        return self.api.get(f"/v1/vms/{name}")["guest"]

    def wait_memload_progress(self, name: str, passes: int = 1, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            memload = (self.guest(name) or {}).get("memload") or {}
            if memload.get("passes", 0) >= passes:
                return memload
            time.sleep(0.5)
        raise AssertionError(f"memload in {name} made no {passes} full passes within {timeout_s} s")


def make_lab(tmp: Path, prefix: str, port: int, hosts: int, host_memory: int, notice_s: float = 1.0,
             planner: str = "", migration: str = "") -> Lab:
    # A fixed folder per prefix, so that a run killed half-way is cleared by the next `lab up`.
    cfg = LabConfig(prefix=prefix, state_dir=Path("/tmp/ferry-e2e") / prefix, controller=f"http://127.0.0.1:{port}",
                    hosts=hosts, host_memory_mib=host_memory, notice_period_s=notice_s, controller_settings=planner,
                    migration_settings=migration)
    up(cfg, log=lambda m: None)
    return Lab(cfg, ControllerClient(cfg.controller))


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """3 hosts of 2048 MiB each, shared by the migration tests of a session."""
    lab = make_lab(tmp_path_factory.mktemp("lab"), "fte2e", 18787, hosts=3, host_memory=2048)
    yield lab
    down(lab.cfg, log=lambda m: None)

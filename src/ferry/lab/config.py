"""Where a lab lives and how big it is. Environment variables let tests run a lab of their own."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONTROLLER = "http://127.0.0.1:8787"


def controller_url() -> str:
    return os.environ.get("FERRY_CONTROLLER", DEFAULT_CONTROLLER)


@dataclass(frozen=True)
class LabConfig:
    prefix: str = os.environ.get("FERRY_LAB_PREFIX", "ferry")
    state_dir: Path = Path(os.environ.get("FERRY_LAB_DIR", "/run/ferry-lab"))
    controller: str = controller_url()
    hosts: int = 3
    host_memory_mib: int = 4096
    host_vcpus: int = 4
    accel: str = "tcg"
    hosts_per_rack: int = 2
    notice_period_s: float = float(os.environ.get("FERRY_LAB_NOTICE_S", "3"))
    controller_settings: str = ""          # extra TOML for the controller's config file (tests)
    fabric_delay_s: float = float(os.environ.get("FERRY_LAB_FABRIC_DELAY_S", "2"))  # route propagation
    migration_settings: str = ""           # extra TOML for the controller's [migration] section

    def host_names(self) -> list[str]:
        return [f"host-{i}" for i in range(1, self.hosts + 1)]

    def host_dir(self, host: str) -> Path:
        return self.state_dir / "hosts" / host

    def agent_socket(self, host: str) -> Path:
        return self.host_dir(host) / "agent.sock"

    @property
    def lab_file(self) -> Path:
        return self.state_dir / "lab.json"

    @property
    def controller_listen(self) -> str:
        return self.controller.removeprefix("http://").rstrip("/")

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def manifest_file(self) -> Path:
        return self.state_dir / "manifest.toml"

    def group(self, index: int) -> str:
        return "blue" if index <= (self.hosts + 1) // 2 else "green"

    def labels(self, index: int) -> dict[str, str]:
        return {"rack": f"rack-{(index - 1) // self.hosts_per_rack + 1}", "zone": "lab-a", "group": self.group(index)}

    def initial_manifest(self) -> str:
        groups = sorted({self.group(i) for i in range(1, self.hosts + 1)})
        return "".join(f'[groups.{g}]\nbios = "1.0"\nhypervisor = "7.2.22"\n\n' for g in groups)

    def controller_config(self) -> str:
        return (f"[controller]\ntick_s = 0.5\n\n[planner]\nnotice_period_s = {self.notice_period_s}\n"
                f"{self.controller_settings}\n[migration]\n{self.migration_settings}\n")

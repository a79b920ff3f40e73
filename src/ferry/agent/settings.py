"""Settings of one host agent."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AgentSettings:
    name: str
    underlay_ip: str                 # where migration streams to this host arrive
    memory_mib: int                  # capacity this host offers to VMs
    vcpus: int
    state_dir: Path                  # one folder per VM: launch spec, QMP socket, pidfile, console
    image_dir: Path | None = None    # guest kernel + initramfs; None: the project's cache
    accel: str = "tcg"               # "kvm" on real hosts
    fabric: str = "none"             # "lab:<fabric netns>" in the lab
    qemu_binary: str = "qemu-system-x86_64"
    labels: dict[str, str] = field(default_factory=dict)
    versions_file: Path | None = None  # software versions this host reports (rewritten by maintenance)
    edac_dir: Path = Path("/sys/devices/system/edac")   # corrected memory errors: mc*/ce_count
    smart_file: Path | None = None     # a file holding the disk's SMART overall-health result
    lab_signals: bool = False          # the lab may inject health signals and rewrite versions
    maintenance_hook: str | None = None  # command run by /v1/maintenance/apply on a real host
    metadata: str = "169.254.169.254:80"  # the guests' metadata server ("off": none)
    pki_dir: Path | None = None           # fleet PKI: HTTPS with client certs, TLS migration streams

    @property
    def qemu_tls_dir(self) -> Path:
        return self.state_dir / "qemu-tls"

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"

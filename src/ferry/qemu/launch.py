"""Turn a VM launch spec into a QEMU command line, and start or stop that process.

The argv builder is pure; `start_qemu` and `stop_qemu` are the effects.
QEMU runs daemonized with a pidfile, so VMs survive a restart of the agent
that started them; the agent re-attaches through the QMP socket.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class LaunchSpec:
    name: str
    memory_mib: int
    vcpus: int
    kernel: str
    initrd: str
    cmdline: str
    mac: str
    tap: str | None                 # None: no NIC (used by tests of the QEMU layer alone)
    run_dir: str                    # holds qmp.sock, qemu.pid, console.log
    accel: str = "tcg"              # "kvm" on real hosts; nested KVM hangs in the lab
    cpu_model: str = "qemu64"       # a named model, never "host": the target must offer the same CPU
    machine: str = "pc-i440fx-7.2"  # a versioned machine type, so both ends agree on the device model
    incoming: bool = False          # start with -incoming defer, to receive a migration
    start_paused: bool = False      # -S: stay paused after an incoming migration (memory verification)

    @property
    def qmp_socket(self) -> str:
        return str(Path(self.run_dir) / "qmp.sock")

    @property
    def pidfile(self) -> str:
        return str(Path(self.run_dir) / "qemu.pid")

    @property
    def console_log(self) -> str:
        return str(Path(self.run_dir) / "console.log")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LaunchSpec":
        return cls(**d)


def qemu_argv(spec: LaunchSpec, binary: str = "qemu-system-x86_64") -> list[str]:
    argv = [
        binary,
        "-name", f"{spec.name},process=ferry-{spec.name}",
        "-machine", f"{spec.machine},accel={spec.accel}",
        "-cpu", spec.cpu_model,
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-kernel", spec.kernel,
        "-initrd", spec.initrd,
        "-append", spec.cmdline,
        "-serial", f"file:{spec.console_log}",
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
        "-pidfile", spec.pidfile,
        "-daemonize",
    ]
    if spec.tap:
        argv += [
            "-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac},romfile=",
        ]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    if spec.start_paused:
        argv.append("-S")
    return argv


class QemuLaunchError(RuntimeError):
    pass


async def start_qemu(spec: LaunchSpec, binary: str = "qemu-system-x86_64") -> int:
    """Start QEMU daemonized; return its pid once its QMP socket exists."""
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (spec.qmp_socket, spec.pidfile):
        Path(stale).unlink(missing_ok=True)
    (run_dir / "launch.json").write_text(json.dumps(spec.to_dict(), indent=1))
    proc = await asyncio.create_subprocess_exec(
        *qemu_argv(spec, binary),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()   # -daemonize: returns once the VM is set up
    if proc.returncode != 0:
        msg = (err or out).decode(errors="replace").strip().splitlines()
        raise QemuLaunchError(f"QEMU for {spec.name} failed to start: {msg[-1] if msg else proc.returncode}")
    pid = read_pid(spec.pidfile)
    if pid is None:
        raise QemuLaunchError(f"QEMU for {spec.name} started but wrote no pidfile")
    return pid


def read_pid(pidfile: str) -> int | None:
    try:
        pid = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def is_our_qemu(pid: int, name: str) -> bool:
    """True when `pid` is the QEMU we launched for VM `name` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{name},process=ferry-{name}".encode() in cmdline


async def stop_qemu(pid: int, name: str, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after a grace period; only if `pid` is still our QEMU."""
    if not is_our_qemu(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        await asyncio.sleep(0.05)
    if is_our_qemu(pid, name):
        os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        await asyncio.sleep(0.02)

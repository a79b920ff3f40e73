"""The guest image boots under TCG and its services and memload work.

The memload self-test runs natively on the host (fast); the VM tests boot the
real image with plain QEMU and user-mode networking.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from ferry.qemu.image import GUEST_SRC, MEMLOAD_CFLAGS, build_image, kernel_cmdline

READY_TIMEOUT_S = 60


# ---- memload on the host ----------------------------------------------------------------

@pytest.fixture(scope="module")
def memload_bin(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    out = tmp_path_factory.mktemp("memload") / "memload"
    subprocess.run(["gcc", *MEMLOAD_CFLAGS, "-o", str(out), str(GUEST_SRC / "memload.c")], check=True)
    return out


def run_memload(binary: Path, tmp: Path, corrupt: bool, until, timeout_s: float = 15.0):
    """Run memload 16 MiB at 200 MiB/s until `until(status)` holds; return (status, stderr)."""
    status_file = tmp / "status.json"
    env = dict(os.environ, MEMLOAD_SELFTEST_CORRUPT="1" if corrupt else "0")
    proc = subprocess.Popen([str(binary), "16", "200", str(status_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status: dict = {}
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if status_file.exists():
                status = json.loads(status_file.read_text())
                if until(status):
                    break
            time.sleep(0.1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    return status, err


def test_memload_clean_run_has_no_errors(memload_bin, tmp_path):
    status, err = run_memload(memload_bin, tmp_path, corrupt=False, until=lambda s: s["passes"] >= 3)
    assert status["passes"] >= 3, status
    assert status["errors"] == 0, err
    assert status["verified_pages"] >= 3 * 16 * 256
    assert "MEMLOAD ERROR" not in err


def test_memload_detects_corruption(memload_bin, tmp_path):
    # The self-test flips one bit after the first pass; the next rewrite must catch it.
    status, err = run_memload(memload_bin, tmp_path, corrupt=True, until=lambda s: s["errors"] >= 1)
    assert status["errors"] == 1, (status, err)
    assert "MEMLOAD ERROR page=2048 gen=1 word=7" in err


# ---- the guest under QEMU TCG ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed")
    image = build_image(log=lambda _msg: None)
    tmp = tmp_path_factory.mktemp("guest")
    console = tmp / "console.log"
    http_port, echo_port = free_port(), free_port()
    cmdline = kernel_cmdline(name="t", ip="10.0.2.15", gateway="10.0.2.2",
                             memload_size_mib=128, memload_rate_mib_s=100)
    argv = [qemu, "-accel", "tcg", "-m", "512", "-smp", "1", "-nographic", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{http_port}-:80,"
                       f"hostfwd=tcp:127.0.0.1:{echo_port}-:7",
            "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{console}", "-display", "none", "-monitor", "none"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        while "FERRY-GUEST-READY" not in (console.read_text(errors="replace") if console.exists() else ""):
            if proc.poll() is not None:
                pytest.fail(f"QEMU exited with {proc.returncode}: {proc.stdout.read()!r}")
            if time.monotonic() - t0 > READY_TIMEOUT_S:
                pytest.fail(f"no FERRY-GUEST-READY in {READY_TIMEOUT_S}s; console:\n"
                            + console.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        print(f"guest ready after {time.monotonic() - t0:.1f}s")
        yield {"http": http_port, "echo": echo_port, "console": console}
    finally:
        # Only our own QEMU, by its PID.
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get_status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/status", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        return json.loads(r.read())


@pytest.mark.e2e
def test_console_ready_marker(guest):
    text = guest["console"].read_text(errors="replace")
    assert "FERRY-GUEST-READY name=t ip=10.0.2.15" in text
    assert "FERRY-GUEST-ERROR" not in text


@pytest.mark.e2e
def test_status_cgi_reports_memload_progress(guest):
    first = get_status(guest["http"])
    assert first["name"] == "t"
    assert first["uptime_s"] > 0
    # memload writes its status before anything else and init waits for it
    # before FERRY-GUEST-READY, so it is never null in a memload guest.
    assert first["memload"] is not None
    deadline = time.monotonic() + 30
    while True:
        time.sleep(2)
        later = get_status(guest["http"])
        ml = later["memload"]
        if ml["verified_pages"] > first["memload"]["verified_pages"] \
                and ml["passes"] >= 1:
            break
        assert time.monotonic() < deadline, f"memload made no progress: {first} -> {later}"
    assert ml["size_mib"] == 128 and ml["rate_mib_s"] == 100
    assert ml["errors"] == 0
    assert ml["written_mib"] > 0
    assert later["uptime_s"] > first["uptime_s"]
    assert "MEMLOAD ERROR" not in guest["console"].read_text(errors="replace")


@pytest.mark.e2e
def test_echo_service_long_lived_connection(guest):
    with socket.create_connection(("127.0.0.1", guest["echo"]), timeout=10) as s:
        f = s.makefile("rwb")
        for i in range(5):
            line = f"ferry echo {i}\n".encode()
            f.write(line)
            f.flush()
            assert f.readline() == line
            time.sleep(0.2)

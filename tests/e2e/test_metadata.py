"""The guest metadata service with a real guest: a QEMU VM on a tap in a namespace of
its own (like a lab host), the service in that namespace (`python -m
ferry.agent.metadata`, driven over stdin), the guest's maintenance-watcher on the
serial console, and a stand-in guest (a veth in a second namespace, configured like
a VM link) for raw requests.

Needs root, QEMU and the guest image (built here if missing or stale).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ferry.net import ipcmd
from ferry.net.addressing import GATEWAY_IP
from ferry.net.vmnet import configure_guest_link, configure_vm_link, create_vm_tap, ensure_metadata_address
from ferry.qemu.image import build_image, kernel_cmdline

pytestmark = pytest.mark.e2e

GUEST, GUEST_IP, GUEST_MAC, GUEST_ID = "mdguest", "10.200.0.20", "52:54:00:6d:64:01", "1001"
STANDIN, STANDIN_IP, STANDIN_ID = "standin", "10.200.0.21", "1002"
TAP, VETH = "ftmdtap0", "ftmdveth0"
READY_TIMEOUT_S = 90
EVENT = re.compile(r"FERRY-MAINTENANCE-EVENT value=(\S+) etag=([0-9a-f]{16}) at=(\d+\.\d+) "
                   r"up=(\d+\.\d+) sent=(\d+\.\d+)")

# Run in the stand-in namespace: GETs of the metadata server, printed as JSON.
PROBE = r"""
import json, socket, sys
out = []
for path, hdr in json.loads(sys.argv[1]):
    try:
        s = socket.create_connection(("169.254.169.254", 80), timeout=5)
    except OSError as e:
        out.append({"error": type(e).__name__}); continue
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: metadata.google.internal\r\n{hdr}\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    out.append({"status": int(lines[0].split()[1]), "body": body.decode(errors="replace"),
                "headers": {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}})
print(json.dumps(out))
"""


class Service:
    """`python -m ferry.agent.metadata` in the namespace, one command line per call."""

    def __init__(self, ns: str, log: Path):
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                ipcmd.netns_exec_argv(ns, [sys.executable, "-m", "ferry.agent.metadata"]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        assert self.proc.stdout.readline().strip() == "ready"

    def __call__(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer.startswith("ok"), f"{line!r}: {answer!r}"
        return answer[2:].strip()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()          # our own child, by its PID
            self.proc.wait()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, taps)")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed")
    image = build_image(log=lambda _msg: None)
    tmp = tmp_path_factory.mktemp("metadata")
    ns = f"ftmd{secrets.token_hex(2)}"
    gns = ns + "g"
    cleanup: list = []
    try:
        for name in (ns, gns):
            ipcmd.ip("netns", "add", name)
            cleanup.append(lambda name=name: ipcmd.ip("netns", "del", name, check=False))
        ipcmd.ip("link", "set", "lo", "up", netns=ns)
        ipcmd.set_sysctls({"net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0"}, ns)
        create_vm_tap(TAP, GUEST_IP, netns=ns, vm_mac=GUEST_MAC)
        ensure_metadata_address(netns=ns)
        # The stand-in guest: a veth whose host end is configured like a VM link.
        ipcmd.ip("link", "add", VETH, "type", "veth", "peer", "name", "eth0", "netns", gns, netns=ns)
        configure_vm_link(VETH, STANDIN_IP, ns)
        configure_guest_link("eth0", STANDIN_IP, gns)

        svc = Service(ns, tmp / "metadata.log")
        cleanup.append(svc.close)
        svc(f"add {GUEST} {TAP} {GUEST_ID}")
        svc(f"add {STANDIN} {VETH} {STANDIN_ID}")

        console = tmp / "console.log"
        argv = ipcmd.netns_exec_argv(ns, [
            qemu, "-accel", "tcg", "-m", "256", "-smp", "1", "-nographic", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", kernel_cmdline(GUEST, GUEST_IP, GATEWAY_IP),
            "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}",
            "-serial", f"file:{console}", "-display", "none", "-monitor", "none"])
        t0 = time.monotonic()
        # `ip netns exec` execs QEMU: the PID is QEMU's.
        qemu_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)

        def stop_qemu() -> None:
            qemu_proc.terminate()
            try:
                qemu_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                qemu_proc.kill()
                qemu_proc.wait()
        cleanup.append(stop_qemu)

        while not ("FERRY-GUEST-READY" in _text(console) and EVENT.search(_text(console))):
            if qemu_proc.poll() is not None:
                pytest.fail(f"QEMU exited with {qemu_proc.returncode}: {qemu_proc.stdout.read()!r}")
            if time.monotonic() - t0 > READY_TIMEOUT_S:
                pytest.fail(f"guest not ready or no maintenance event in {READY_TIMEOUT_S}s; console:\n"
                            + _text(console)[-3000:])
            time.sleep(0.1)
        print(f"guest ready, watcher reported, after {time.monotonic() - t0:.1f}s")
        yield {"ns": ns, "gns": gns, "svc": svc, "console": console}
    finally:
        for undo in reversed(cleanup):
            undo()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def events(console: Path) -> list[re.Match]:
    return list(EVENT.finditer(_text(console)))


def wait_event(console: Path, count: int, timeout_s: float) -> tuple[re.Match, float]:
    """The count-th event line and the host time at which it was first seen (10 ms polls)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = events(console)
        if len(found) >= count:
            return found[count - 1], time.time()
        time.sleep(0.01)
    raise AssertionError(f"no event #{count} within {timeout_s}s; console:\n{_text(console)[-2000:]}")


def probe(gns: str, requests: list[tuple[str, str]]) -> list[dict]:
    out = subprocess.run(ipcmd.netns_exec_argv(gns, [sys.executable, "-c", PROBE, json.dumps(requests)]),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_watcher_reports_none_at_start(setup):
    first = events(setup["console"])[0]
    assert first[1] == "NONE"
    text = _text(setup["console"])
    assert "FERRY-GUEST-ERROR" not in text and "FERRY-MAINTENANCE-WATCH error" not in text


def test_guest_sees_each_change_within_a_second(setup):
    svc, console = setup["svc"], setup["console"]
    n = len(events(console))
    # Another VM's change is not this guest's: nothing appears on its console.
    svc(f"set {STANDIN} MIGRATE_ON_HOST_MAINTENANCE")
    time.sleep(1.5)
    assert len(events(console)) == n
    svc(f"set {STANDIN} NONE")

    latencies = []
    for value in ("MIGRATE_ON_HOST_MAINTENANCE", "NONE", "TERMINATE_ON_HOST_MAINTENANCE", "NONE",
                  "MIGRATE_ON_HOST_MAINTENANCE", "NONE"):
        time.sleep(0.5)                 # the watcher is back in its long poll
        set_at = float(svc(f"set {GUEST} {value}"))
        n += 1
        m, seen_at = wait_event(console, n, 5)
        assert m[1] == value
        sent, guest_at = float(m[5]), float(m[3])
        latencies.append((seen_at - set_at, sent - set_at, guest_at - sent))
        assert set_at <= sent < seen_at
        assert seen_at - set_at < 1.0, f"{value}: seen {seen_at - set_at:.3f}s after set"
    for seen, sent, clock in latencies:
        print(f"notice: set->console {seen * 1000:.0f} ms, set->sent {sent * 1000:.1f} ms, "
              f"guest at - host sent {clock * 1000:+.0f} ms")
    assert len({m[2] for m in events(console)}) == 3        # one ETag per distinct value


def test_guest_status_shows_the_value(setup):
    svc, console = setup["svc"], setup["console"]
    n = len(events(console))
    svc(f"set {GUEST} MIGRATE_ON_HOST_MAINTENANCE")
    wait_event(console, n + 1, 5)
    try:
        status = subprocess.run(ipcmd.netns_exec_argv(setup["ns"], [
            sys.executable, "-c",
            f"import urllib.request;print(urllib.request.urlopen('http://{GUEST_IP}/cgi-bin/status',"
            f"timeout=20).read().decode())"]), capture_output=True, text=True, timeout=60, check=True).stdout
        assert json.loads(status)["maintenance_event"] == "MIGRATE_ON_HOST_MAINTENANCE"
    finally:
        svc(f"set {GUEST} NONE")
        wait_event(console, n + 2, 5)


def test_identity_comes_from_the_link_and_the_header_is_required(setup):
    svc = setup["svc"]
    base = "/computeMetadata/v1/instance/"
    flavor = "Metadata-Flavor: Google\r\n"
    svc(f"set {STANDIN} TERMINATE_ON_HOST_MAINTENANCE " + json.dumps(
        {"type": "SCHEDULED", "maintenance_status": "PENDING", "window_start_time": "2030-01-01T00:00:00.000Z",
         "window_end_time": "2030-01-01T01:00:00.000Z", "latest_window_start_time": "2030-01-01T00:00:00.000Z",
         "can_reschedule": False}))
    try:
        no_header, name, vm_id, event, upcoming, spoof = probe(setup["gns"], [
            (base + "maintenance-event", ""),
            (base + "name", flavor),
            (base + "id", flavor),
            (base + "maintenance-event", flavor),
            (base + "upcoming-maintenance", flavor),
            # Nothing the guest claims changes who it is.
            (base + "name?vm=mdguest", flavor + f"Host: {GUEST_IP}\r\nX-Ferry-Vm: {GUEST}\r\n"),
        ])
        assert no_header["status"] == 403
        assert "Missing Metadata-Flavor:Google header." in no_header["body"]
        assert no_header["headers"]["metadata-flavor"] == "Google"
        assert (name["status"], name["body"]) == (200, STANDIN)
        assert vm_id["body"] == STANDIN_ID
        assert event["body"] == "TERMINATE_ON_HOST_MAINTENANCE" and len(event["headers"]["etag"]) == 16
        assert json.loads(upcoming["body"])["maintenance_status"] == "PENDING"
        assert spoof["body"] == STANDIN
        assert svc(f"get {GUEST}") == "NONE"
    finally:
        svc(f"set {STANDIN} NONE")

    # A link the service does not serve gets no answer from anyone's listener.
    svc(f"remove {STANDIN}")
    try:
        assert probe(setup["gns"], [(base + "name", flavor)]) == [{"error": "ConnectionRefusedError"}]
    finally:
        svc(f"add {STANDIN} {VETH} {STANDIN_ID}")


def test_a_guest_whose_server_vanished_catches_up(setup):
    """As after a migration: the guest's hanging request is on a connection whose server
    is gone without a word (its FIN is dropped, like a FIN from the old host), and the
    value changed meanwhile. The watcher's client-side timeout (2 + 3 s while maintenance
    is pending) ends the dead request and the next one gets the new value."""
    svc, console, ns = setup["svc"], setup["console"], setup["ns"]
    n = len(events(console))
    svc(f"set {GUEST} MIGRATE_ON_HOST_MAINTENANCE")
    wait_event(console, n + 1, 5)
    time.sleep(0.5)                                  # the guest waits on its next request
    # The server's FIN must never reach the guest. A blackhole route would not stop it:
    # a device-bound socket whose route lookup fails sends on its device anyway.
    ipcmd.ip("link", "set", "dev", TAP, "down", netns=ns)
    try:
        svc(f"remove {GUEST}")                       # closes the connection: FIN not sent
        # The kernel would send it once the link is up again: destroy the orphaned socket.
        ipcmd.run(ipcmd.netns_exec_argv(ns, [ipcmd.resolve_tool("ss"), "-K", "-tn", "dst", GUEST_IP]))
    finally:
        configure_vm_link(TAP, GUEST_IP, ns, vm_mac=GUEST_MAC)    # up, route, neighbour
    svc(f"add {GUEST} {TAP} {GUEST_ID}")             # "the new host": value NONE
    t0 = time.time()
    m, seen = wait_event(console, n + 2, 15)
    assert m[1] == "NONE"
    print(f"caught up {seen - t0:.1f}s after the server vanished: "
          + " | ".join(re.findall(r"FERRY-MAINTENANCE-WATCH [^\n]*", _text(console))))
    assert seen - t0 < 8
    assert "FERRY-MAINTENANCE-WATCH error=rc137" in _text(console)


def test_service_logged_no_errors(setup):
    assert _text(setup["svc"].log) == ""

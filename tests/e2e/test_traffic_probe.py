"""End-to-end test of the traffic probe (ferry.lab.traffic) against a stand-in guest.

Needs root. A lab with a random prefix ``ft<4 hex>``; the "guest" is a
namespace joined to a host by a veth configured exactly like a VM tap, running
a TCP echo service on port 7 (like the guest's ``nc -ll -p 7 -e cat``) and an
HTTP server answering ``/cgi-bin/status`` on port 80. Traffic only goes to
addresses inside namespaces created here; every namespace and process is
removed at teardown. The helpers are shared with test_forwarding.py.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ferry.lab.traffic import collect, run_probe_in_client, wait_ready
from ferry.net import ipcmd
from ferry.net.addressing import LabLayout, LabMember, tap_name, vm_mac
from ferry.net.lab import LabNetwork, netns_exec_argv
from ferry.net.vmnet import configure_guest_link, configure_vm_link

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("ip") is None and not os.path.exists("/usr/sbin/ip"), reason="needs iproute2"),
]

GUEST_SERVERS = r"""
import socketserver, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ip = sys.argv[1]

class Echo(socketserver.BaseRequestHandler):          # like `nc -ll -p 7 -e cat`
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)

class Status(BaseHTTPRequestHandler):                 # like the guest's status CGI
    def do_GET(self):
        if self.path != "/cgi-bin/status":
            self.send_error(404)
            return
        body = b'{"ok": true}\n'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

class HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self):  # HTTPServer's would look up the address's name (a DNS query)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "guest", self.server_address[1]

echo = EchoServer((ip, 7), Echo)
http = HttpServer((ip, 80), Status)
threading.Thread(target=echo.serve_forever, daemon=True).start()
print("ready", flush=True)
http.serve_forever()
"""


def new_prefix() -> str:
    return "ft" + secrets.token_hex(2)


class Procs:
    """Processes started by a test; killed by PID at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def add(self, p: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.kill()
        try:
            p.communicate(timeout=10)
        except (ValueError, OSError):  # streams already consumed by collect()
            p.wait(timeout=10)

    def stop_all(self) -> None:
        for p in self.procs:
            self.stop(p)
        self.procs.clear()


@dataclass
class Guest:
    """A stand-in VM: namespace ``{prefix}-g1`` joined by a veth to a host."""

    netns: str
    ip: str
    link: str  # host-side end (named like a tap), lives in the namespace of the host running the guest
    server: subprocess.Popen

    def move(self, src: LabMember, dst: LabMember) -> None:
        """The stand-in's "blackout": its host-side link goes to *dst* (addresses
        and routes on *src* vanish with it) and is configured there like a tap."""
        ipcmd.ip("link", "set", "dev", self.link, "netns", dst.netns, netns=src.netns)
        configure_vm_link(self.link, self.ip, netns=dst.netns)


def start_guest(lab: LabNetwork, host: LabMember, procs: Procs, vm_ip: str = "10.200.0.10",
                vm_name: str = "vm-traffic") -> Guest:
    guest_ns = f"{lab.layout.prefix}-g1"  # under the lab prefix: destroy() removes it
    link = tap_name(vm_name)
    ipcmd.add_netns(guest_ns)
    ipcmd.ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", guest_ns, netns=host.netns)
    configure_guest_link("eth0", vm_ip, netns=guest_ns, mac=vm_mac(vm_name))
    configure_vm_link(link, vm_ip, netns=host.netns)
    server = procs.add(subprocess.Popen(netns_exec_argv(guest_ns, [sys.executable, "-c", GUEST_SERVERS, vm_ip]),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert server.stdout is not None
    line = server.stdout.readline().strip()
    assert line == "ready", f"guest servers did not start: {line!r} {server.stderr.read() if server.stderr else ''}"
    return Guest(guest_ns, vm_ip, link, server)


def destroy_lab(lab: LabNetwork) -> None:
    lab.destroy()
    left = [ns for ns in ipcmd.list_netns() if lab.layout.owns_namespace(ns)]
    assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def netlab(request: pytest.FixtureRequest) -> LabNetwork:
    """An empty LabNetwork with a random prefix, destroyed at teardown (also on failure)."""
    net = LabNetwork(LabLayout(new_prefix()))
    assert net.existing_namespaces() == []
    request.addfinalizer(lambda: destroy_lab(net))
    return net


@pytest.fixture
def procs(netlab: LabNetwork) -> Iterator[Procs]:
    # depends on netlab, so it is torn down first: no process pins a namespace at destroy()
    p = Procs()
    yield p
    p.stop_all()


# --------------------------------------------------------------------------------------- tests


def test_probe_steady_state(netlab: LabNetwork, procs: Procs) -> None:
    hosts = netlab.create(["h1"])
    guest = start_guest(netlab, hosts["h1"], procs)
    netlab.fabric().announce(guest.ip, hosts["h1"].underlay_ip)

    probe = procs.add(run_probe_in_client(netlab.layout.prefix, guest.ip, 2.0, timeline=True))
    assert wait_ready(probe), probe.probe_stderr  # type: ignore[attr-defined]
    r = collect(probe)
    print(f"\nsteady state: {r['echo']} {r['http']}")
    e, h = r["echo"], r["http"]
    assert r["exit_status"] == 0
    assert e["connected"] and e["survived"] and e["failure"] is None
    assert e["sent"] == e["received"] and 120 <= e["sent"] <= 210  # a line every 10 ms for 2 s
    assert e["longest_gap_ms"] < 200
    assert e["rtt_ms"]["p50"] is not None and e["rtt_ms"]["p50"] < 50
    assert h["failed"] == 0 and 25 <= h["ok"] <= 45  # a request every 50 ms
    assert h["longest_gap_ms"] < 300
    assert len(r["timeline"]["echo_replies"]) == e["received"]
    assert r["started_at"] <= r["timeline"]["echo_replies"][0] <= r["ended_at"] + 5


def test_probe_sees_a_dead_echo_service_and_an_unreachable_vm(netlab: LabNetwork, procs: Procs) -> None:
    hosts = netlab.create(["h1"])
    guest = start_guest(netlab, hosts["h1"], procs)
    fab = netlab.fabric()
    fab.announce(guest.ip, hosts["h1"].underlay_ip)

    probe = procs.add(run_probe_in_client(netlab.layout.prefix, guest.ip, 3.0))
    assert wait_ready(probe)
    time.sleep(1.0)
    procs.stop(guest.server)  # the guest's services die: connection reset/EOF, HTTP refused
    r = collect(probe)
    print(f"\ndead services: {r['echo']} {r['http']}")
    assert r["exit_status"] == 1
    assert r["echo"]["connected"] and not r["echo"]["survived"]
    assert r["echo"]["failure"].startswith(("eof", "reset"))
    assert r["echo"]["longest_gap_ms"] >= 1500  # from the death to the end of the run
    assert r["http"]["ok"] > 0 and r["http"]["failed"] > 0

    # the VM's route is withdrawn: nothing answers at all, the probe still ends on time
    assert fab.withdraw(guest.ip, hosts["h1"].underlay_ip)
    t0 = time.monotonic()
    probe = procs.add(run_probe_in_client(netlab.layout.prefix, guest.ip, 1.0))
    assert not wait_ready(probe)
    r = collect(probe)
    assert time.monotonic() - t0 < 15
    assert not r["echo"]["connected"] and r["echo"]["failure"].startswith("connect")
    assert r["http"]["ok"] == 0 and r["http"]["failed"] > 0

"""End-to-end test of the lab network: real namespaces, veths, taps and routes.

Needs root. Every lab uses a random prefix ``ft<4 hex>`` (never the default
``ferry``), and fixtures delete every namespace they create, even on failure.
Traffic only goes to addresses inside namespaces created here.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ferry.net import ipcmd
from ferry.net.addressing import GATEWAY_IP, GATEWAY_MAC, METADATA_IP, LabLayout, tap_name, vm_mac
from ferry.net.errors import NamespaceExistsError
from ferry.net.fabric import LabFabric
from ferry.net.lab import LabNetwork, netns_exec_argv
from ferry.net.vmnet import (
    configure_guest_link,
    configure_vm_link,
    create_vm_tap,
    delete_vm_tap,
    ensure_metadata_address,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("ip") is None and not os.path.exists("/usr/sbin/ip"), reason="needs iproute2"),
]

PY = sys.executable

SERVER = r"""
import socket, sys
ip, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
s.listen(16)
print("ready", flush=True)
while True:
    c, addr = s.accept()
    with c:
        c.settimeout(5)
        data = c.recv(1024)
        c.sendall(f"{tag} {addr[0]} ".encode() + data)
"""

CLIENT = r"""
import socket, sys, time
ip, port, patience = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + patience
while True:
    try:
        with socket.create_connection((ip, port), timeout=2) as c:
            c.sendall(b"ping")
            c.shutdown(socket.SHUT_WR)
            print(c.recv(1024).decode())
            break
    except OSError as e:
        if time.monotonic() > deadline:
            print(f"ERR {e}")
            sys.exit(1)
        time.sleep(0.1)
"""


def _prefix() -> str:
    return "ft" + secrets.token_hex(2)


def _cleanup(lab: LabNetwork) -> None:
    lab.destroy()
    left = [ns for ns in ipcmd.list_netns() if lab.layout.owns_namespace(ns)]
    assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> LabNetwork:
    """An empty LabNetwork with a random prefix, destroyed at teardown (also on failure)."""
    net = LabNetwork(LabLayout(_prefix()))
    assert net.existing_namespaces() == []
    request.addfinalizer(lambda: _cleanup(net))
    return net


class Servers:
    """TCP servers started in namespaces by this test; killed by PID at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, ns: str, ip: str, port: int, tag: str) -> None:
        p = subprocess.Popen(
            netns_exec_argv(ns, [PY, "-c", SERVER, ip, str(port), tag]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if line != "ready":
            p.kill()
            raise AssertionError(f"server in {ns} on {ip}:{port} did not start: {line!r} {p.stderr.read() if p.stderr else ''}")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        self.procs.clear()


@pytest.fixture
def servers(lab: LabNetwork, request: pytest.FixtureRequest) -> Iterator[Servers]:
    # depends on `lab`, so it is torn down first: no process pins a namespace at destroy()
    s = Servers()
    request.addfinalizer(s.stop_all)
    yield s


def connect(ns: str, ip: str, port: int, patience: float = 10.0) -> str:
    """Connect from namespace *ns*; returns the server's answer '<tag> <peer ip> ping' or 'ERR ...'."""
    cp = subprocess.run(
        netns_exec_argv(ns, [PY, "-c", CLIENT, ip, str(port), str(patience)]),
        capture_output=True, text=True, timeout=patience + 30,
    )
    return (cp.stdout.strip() or cp.stderr.strip())


def sysctl_value(ns: str, key: str) -> str:
    return ipcmd.run(netns_exec_argv(ns, [ipcmd.resolve_tool("sysctl"), "-n", key])).stdout.strip()


# --------------------------------------------------------------------------------------- tests


def test_create_refuses_existing_namespaces_and_destroy_is_idempotent(lab: LabNetwork) -> None:
    lay = lab.layout
    ipcmd.add_netns(lay.host_ns("h2"))  # a leftover
    with pytest.raises(NamespaceExistsError, match=lay.host_ns("h2")):
        lab.create(["h1", "h2"])
    assert lab.existing_namespaces() == [lay.host_ns("h2")]  # nothing was created
    assert lab.destroy() == [lay.host_ns("h2")]

    hosts = lab.create(["h1", "h2"])
    assert sorted(lab.existing_namespaces()) == sorted(
        [lay.fabric_ns(), lay.client_ns(), lay.host_ns("h1"), lay.host_ns("h2")])
    assert hosts["h1"].underlay_ip == "10.201.1.2" and hosts["h2"].underlay_ip == "10.201.2.2"
    assert lab.hosts() == hosts
    with pytest.raises(NamespaceExistsError):
        lab.create(["h3"])  # fabric and client exist
    assert lab.existing_namespaces() == sorted(
        [lay.fabric_ns(), lay.client_ns(), lay.host_ns("h1"), lay.host_ns("h2")])

    # sysctls of a routing namespace
    for ns in (lay.fabric_ns(), lay.host_ns("h1")):
        assert sysctl_value(ns, "net.ipv4.ip_forward") == "1"
        assert sysctl_value(ns, "net.ipv4.conf.all.rp_filter") == "0"

    assert len(lab.destroy()) == 4
    names = ipcmd.run(["ip", "netns", "list"]).stdout
    assert lay.prefix + "-" not in names
    assert lab.destroy() == []
    assert lab.destroy() == []


def test_create_rolls_back_on_failure(lab: LabNetwork, monkeypatch: pytest.MonkeyPatch) -> None:
    real_join = LabNetwork._join

    def failing_join(self: LabNetwork, member):  # type: ignore[no-untyped-def]
        if member.name == "h2":
            raise RuntimeError("injected failure")
        real_join(self, member)

    monkeypatch.setattr(LabNetwork, "_join", failing_join)
    with pytest.raises(RuntimeError, match="injected"):
        lab.create(["h1", "h2", "h3"])
    assert lab.existing_namespaces() == []


def test_host_underlay_reaches_other_host(lab: LabNetwork, servers: Servers) -> None:
    hosts = lab.create(["h1", "h2"])
    h1, h2 = hosts["h1"], hosts["h2"]
    servers.start(h2.netns, h2.underlay_ip, 7001, "h2")
    assert connect(h1.netns, h2.underlay_ip, 7001) == f"h2 {h1.underlay_ip} ping"
    # the client reaches hosts too, without NAT
    assert connect(lab.layout.client_ns(), h2.underlay_ip, 7001) == f"h2 {lab.layout.client_ip()} ping"


def test_vm_tap_lifecycle(lab: LabNetwork) -> None:
    hosts = lab.create(["h1"])
    ns = hosts["h1"].netns
    tap, tap2 = tap_name("vm-a"), tap_name("vm-b")
    for _ in range(2):  # idempotent: the second call recreates it
        create_vm_tap(tap, "10.200.0.10", netns=ns, vm_mac=vm_mac("vm-a"))
    create_vm_tap(tap2, "10.200.0.11", netns=ns)

    (link,) = ipcmd.ip_json("-d", "link", "show", "dev", tap, netns=ns)
    assert link["address"] == GATEWAY_MAC
    assert "UP" in link["flags"]
    assert link["linkinfo"]["info_kind"] == "tun" and link["linkinfo"]["info_data"]["type"] == "tap"
    (addr,) = ipcmd.ip_json("addr", "show", "dev", tap, netns=ns)
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"] if a["family"] == "inet"] == [(GATEWAY_IP, 32)]
    (route,) = ipcmd.ip_json("route", "show", "exact", "10.200.0.10/32", netns=ns)
    assert route["dev"] == tap
    (neigh,) = ipcmd.ip_json("neigh", "show", "10.200.0.10", "dev", tap, netns=ns)
    assert neigh["lladdr"] == vm_mac("vm-a") and "PERMANENT" in neigh["state"]
    assert sysctl_value(ns, f"net.ipv4.conf.{tap}.rp_filter") == "1"
    assert sysctl_value(ns, f"net.ipv4.conf.{tap}.arp_announce") == "2"

    ensure_metadata_address(ns)
    ensure_metadata_address(ns)
    lo = ipcmd.ip_json("addr", "show", "dev", "lo", netns=ns)
    assert METADATA_IP in [a["local"] for a in lo[0]["addr_info"]]

    assert delete_vm_tap(tap, netns=ns) is True
    assert delete_vm_tap(tap, netns=ns) is False
    assert ipcmd.ip_json("route", "show", "exact", "10.200.0.10/32", netns=ns) == []
    # the gateway stays a local address of the other tap
    local = ipcmd.ip_json("route", "show", "table", "local", GATEWAY_IP, netns=ns)
    assert [r["dev"] for r in local] == [tap2]
    assert delete_vm_tap(tap2, netns=ns) is True


def test_fabric_routes_and_late_withdraw(lab: LabNetwork) -> None:
    hosts = lab.create(["h1", "h2"])
    fab = lab.fabric()
    vm = "10.200.0.42"
    u1, u2 = hosts["h1"].underlay_ip, hosts["h2"].underlay_ip
    assert fab.lookup(vm) is None
    assert fab.withdraw(vm, u1) is False
    fab.announce(vm, u1)
    fab.announce(vm, u1)
    assert fab.lookup(vm) == u1
    fab.announce(vm, u2)  # migration: target announces
    assert fab.withdraw(vm, u1) is False  # late withdraw by the source is a no-op
    assert fab.lookup(vm) == u2
    assert fab.routes() == {vm: u2}
    assert fab.withdraw(vm, u2) is True
    assert fab.lookup(vm) is None and fab.routes() == {}


def test_vm_reachable_from_client_and_after_move(lab: LabNetwork, servers: Servers) -> None:
    """A veth stand-in guest in {prefix}-g1, configured like a real guest; its host
    side is configured exactly like a tap. Move it from h1 to h2."""
    lay = lab.layout
    hosts = lab.create(["h1", "h2"])
    h1, h2 = hosts["h1"], hosts["h2"]
    fab: LabFabric = lab.fabric()
    client_ns = lay.client_ns()
    vm_name, vm_ip = "vm-move", "10.200.0.10"
    link = tap_name(vm_name)
    guest_ns = f"{lay.prefix}-g1"  # under the lab prefix: destroy() removes it

    ipcmd.add_netns(guest_ns)
    ipcmd.ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", guest_ns, netns=h1.netns)
    configure_guest_link("eth0", vm_ip, netns=guest_ns, mac=vm_mac(vm_name))
    configure_vm_link(link, vm_ip, netns=h1.netns)
    for h in (h1, h2):
        ensure_metadata_address(h.netns)
        servers.start(h.netns, METADATA_IP, 8080, f"md-{h.name}")
    servers.start(guest_ns, vm_ip, 7000, "guest")

    # not announced yet: the fabric has no route, the client cannot reach the VM
    assert connect(client_ns, vm_ip, 7000, patience=0.5).startswith("ERR")

    fab.announce(vm_ip, h1.underlay_ip)
    assert fab.lookup(vm_ip) == h1.underlay_ip
    assert connect(client_ns, vm_ip, 7000) == f"guest {lay.client_ip()} ping"
    # the guest reaches its host's metadata server through the gateway
    assert connect(guest_ns, METADATA_IP, 8080) == f"md-h1 {vm_ip} ping"
    # and another host's underlay through its default route
    servers.start(h2.netns, h2.underlay_ip, 7002, "h2")
    assert connect(guest_ns, h2.underlay_ip, 7002) == f"h2 {vm_ip} ping"
    (gw_neigh,) = ipcmd.ip_json("neigh", "show", GATEWAY_IP, "dev", "eth0", netns=guest_ns)
    assert gw_neigh["lladdr"] == GATEWAY_MAC

    # ---- move: the VM link goes to h2 (its addresses/routes on h1 vanish with it)
    ipcmd.ip("link", "set", "dev", link, "netns", h2.netns, netns=h1.netns)
    configure_vm_link(link, vm_ip, netns=h2.netns)
    fab.announce(vm_ip, h2.underlay_ip)
    assert fab.withdraw(vm_ip, h1.underlay_ip) is False  # late withdraw by the source
    assert fab.lookup(vm_ip) == h2.underlay_ip
    assert ipcmd.ip_json("route", "show", "exact", f"{vm_ip}/32", netns=h1.netns) == []

    assert connect(client_ns, vm_ip, 7000) == f"guest {lay.client_ip()} ping"
    assert connect(guest_ns, METADATA_IP, 8080) == f"md-h2 {vm_ip} ping"
    # the guest's ARP entry for the gateway never had to change
    (gw_neigh,) = ipcmd.ip_json("neigh", "show", GATEWAY_IP, "dev", "eth0", netns=guest_ns)
    assert gw_neigh["lladdr"] == GATEWAY_MAC

    assert delete_vm_tap(link, netns=h2.netns) is True  # deletes the veth pair
    assert fab.withdraw(vm_ip, h2.underlay_ip) is True
    assert fab.lookup(vm_ip) is None

"""Pure command builders and factories of ferry.net (no root, no effects)."""

from __future__ import annotations

import pytest

from ferry.net.addressing import GATEWAY_IP, GATEWAY_MAC
from ferry.net.errors import InvalidNetValue, NamespaceExistsError, NetCommandError
from ferry.net.fabric import Fabric, LabFabric, NullFabric, fabric_from_spec
from ferry.net.ipcmd import ip_argv, sysctl_argv
from ferry.net.lab import netns_exec_argv, router_sysctls
from ferry.net.vmnet import guest_network_commands, vm_link_commands, vm_link_sysctls


def test_ip_argv() -> None:
    assert ip_argv(None, "link", "show") == ["ip", "link", "show"]
    assert ip_argv("ns1", "-j", "route") == ["ip", "-n", "ns1", "-j", "route"]


def test_netns_exec_argv() -> None:
    assert netns_exec_argv("ferry-h1", ["python", "-c", "1"]) == [
        "ip", "netns", "exec", "ferry-h1", "python", "-c", "1"]


def test_sysctl_argv() -> None:
    a = sysctl_argv({"net.ipv4.ip_forward": 1})
    assert a[0].endswith("sysctl") and a[1:] == ["-q", "-w", "net.ipv4.ip_forward=1"]
    b = sysctl_argv({"net.ipv4.ip_forward": "1"}, "ns")
    assert b[:4] == ["ip", "netns", "exec", "ns"] and b[4:] == a


def test_vm_link_commands() -> None:
    cmds = vm_link_commands("ft12345678", "10.200.0.10")
    assert ["link", "set", "dev", "ft12345678", "address", GATEWAY_MAC] in cmds
    assert ["addr", "replace", f"{GATEWAY_IP}/32", "dev", "ft12345678"] in cmds
    assert ["route", "replace", "10.200.0.10/32", "dev", "ft12345678", "scope", "link"] in cmds
    assert cmds.index(["link", "set", "dev", "ft12345678", "up"]) < len(cmds) - 1  # up before the route
    with_neigh = vm_link_commands("ft12345678", "10.200.0.10", "52:54:00:AA:bb:cc")
    assert with_neigh[-1] == ["neigh", "replace", "10.200.0.10", "lladdr", "52:54:00:aa:bb:cc",
                              "dev", "ft12345678", "nud", "permanent"]
    with pytest.raises(InvalidNetValue):
        vm_link_commands("ft1", GATEWAY_IP)
    with pytest.raises(InvalidNetValue):
        vm_link_commands("bad.name", "10.200.0.10")


def test_vm_link_sysctls() -> None:
    s = vm_link_sysctls("ft1")
    assert s["net.ipv4.ip_forward"] == "1"
    assert s["net.ipv4.conf.ft1.rp_filter"] == "1"
    assert s["net.ipv4.conf.ft1.arp_announce"] == "2"
    assert s["net.ipv4.conf.ft1.proxy_arp"] == "0"


def test_router_sysctls() -> None:
    s = router_sysctls(["fab-h1"])
    assert s["net.ipv4.ip_forward"] == "1"
    assert s["net.ipv4.conf.all.rp_filter"] == "0"
    assert s["net.ipv4.conf.default.rp_filter"] == "0"
    assert s["net.ipv4.conf.fab-h1.rp_filter"] == "0"


def test_guest_network_commands() -> None:
    assert guest_network_commands("10.200.0.10") == [
        "ip addr add 10.200.0.10/32 dev eth0",
        "ip link set eth0 up",
        f"ip route add {GATEWAY_IP} dev eth0 scope link",
        f"ip route add default via {GATEWAY_IP} dev eth0",
    ]


def test_fabric_from_spec() -> None:
    f = fabric_from_spec("lab:ferry-fabric")
    assert isinstance(f, LabFabric) and f.fabric_ns == "ferry-fabric" and f.spec == "lab:ferry-fabric"
    n = fabric_from_spec("none")
    assert isinstance(n, NullFabric) and n.spec == "none"
    assert isinstance(f, Fabric) and isinstance(n, Fabric)
    for bad in ("", "lab:", "bgp:x", "lab"):
        with pytest.raises(InvalidNetValue, match="invalid fabric spec"):
            fabric_from_spec(bad)


def test_null_fabric_is_noop() -> None:
    n = NullFabric()
    assert n.announce("10.200.0.10", "10.201.1.2") is None
    assert n.withdraw("10.200.0.10", "10.201.1.2") is False
    assert n.lookup("10.200.0.10") is None


def test_lab_fabric_validates_before_running_anything() -> None:
    f = LabFabric("does-not-matter")
    with pytest.raises(InvalidNetValue):
        f.announce("10.201.1.2", "10.201.1.2")  # not a VM address
    with pytest.raises(InvalidNetValue):
        f.withdraw("10.200.0.10", "nope")


def test_error_messages_are_one_line() -> None:
    e = NetCommandError(["ip", "route", "add"], 2, "RTNETLINK answers: File exists\nmore\n")
    assert "\n" not in str(e) and "exit 2" in str(e) and "File exists" in str(e)
    assert "timed out" in str(NetCommandError(["ip"], None, ""))
    assert "ft-h1" in str(NamespaceExistsError(["ft-h1"]))

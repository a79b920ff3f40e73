"""ferry.net.forwarding without root: pure builders, and the effect functions
against a fake `ip` (order of commands, idempotency, teardown)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from ferry.net import forwarding as fw
from ferry.net import ipcmd
from ferry.net.addressing import validate_mac
from ferry.net.errors import InvalidNetValue

VM = "10.200.0.10"
SRC, DST = "10.201.1.2", "10.201.2.2"


# --------------------------------------------------------------------------- pure


def test_names_vni_mac() -> None:
    assert fw.forward_ifname(VM) == "fwd-0-10"
    assert fw.forward_ifname("10.200.255.250") == "fwd-255-250"
    assert all(len(fw.forward_ifname(f"10.200.{x}.{y}")) <= 15 for x in (0, 99, 255) for y in (1, 10, 250))
    assert fw.forward_vni(VM) == (200 << 16) | 10 == 0xC8000A
    assert fw.forward_vni("10.200.1.2") != fw.forward_vni("10.200.2.1")
    assert fw.vm_ip_of_vni(fw.forward_vni("10.200.7.9")) == "10.200.7.9"
    for bad in (0, -1, 1 << 24, True, "13107210", (10 << 16) | 5):
        assert fw.vm_ip_of_vni(bad) is None  # type: ignore[arg-type]
    assert fw.forward_mac(SRC) == "02:66:0a:c9:01:02"
    assert validate_mac(fw.forward_mac(SRC)) == fw.forward_mac(SRC)  # unicast, locally administered
    assert fw.forward_mac(SRC) != fw.forward_mac(DST)
    with pytest.raises(InvalidNetValue):
        fw.forward_ifname("10.201.1.2")  # not a VM address
    with pytest.raises(InvalidNetValue):
        fw.forward_mac("nope")


def test_tunnel_link_commands() -> None:
    assert fw.tunnel_link_commands(VM, SRC, DST) == [
        ["link", "add", "fwd-0-10", "type", "vxlan", "id", str(0xC8000A),
         "local", SRC, "remote", DST, "dstport", "4789", "nolearning"],
        ["link", "set", "dev", "fwd-0-10", "address", "02:66:0a:c9:01:02", "mtu", "1450"],
        ["addr", "replace", f"{SRC}/32", "dev", "fwd-0-10"],
    ]
    cmds = fw.tunnel_link_commands(VM, DST, SRC, port=8472, mtu=8950)
    assert cmds[0][cmds[0].index("dstport") + 1] == "8472" and cmds[1][-1] == "8950"
    assert cmds[1][cmds[1].index("address") + 1] == fw.forward_mac(DST)
    with pytest.raises(InvalidNetValue, match="two different hosts"):
        fw.tunnel_link_commands(VM, SRC, SRC)
    for port in (0, 65536, True):
        with pytest.raises(InvalidNetValue, match="port"):
            fw.tunnel_link_commands(VM, SRC, DST, port=port)
    with pytest.raises(InvalidNetValue, match="MTU"):
        fw.tunnel_link_commands(VM, SRC, DST, mtu=100)


def test_forward_route_and_stop_commands() -> None:
    assert fw.forward_route_commands(VM, DST) == [
        ["neigh", "replace", VM, "lladdr", fw.forward_mac(DST), "dev", "fwd-0-10", "nud", "permanent"],
        ["route", "replace", f"{VM}/32", "dev", "fwd-0-10", "scope", "link"],
    ]
    assert fw.stop_forwarding_commands(VM) == [
        ["route", "del", f"{VM}/32", "dev", "fwd-0-10"], ["link", "del", "dev", "fwd-0-10"]]


def test_tunnel_sysctls() -> None:
    s = fw.tunnel_sysctls("fwd-0-10")
    assert s["net.ipv4.ip_forward"] == "1"
    assert s["net.ipv4.conf.fwd-0-10.rp_filter"] == "2"  # loose: wins over all=1 (max rule)
    assert s["net.ipv4.conf.fwd-0-10.send_redirects"] == "0"
    with pytest.raises(InvalidNetValue):
        fw.tunnel_sysctls("bad.name")


# --------------------------------------------------------------------------- effects against a fake `ip`


class FakeIp:
    """Just enough of `ip` for ferry.net.forwarding, in one namespace."""

    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []
        self.links: dict[str, dict[str, Any]] = {}
        self.routes: dict[str, str] = {}  # vm/32 -> dev
        self.neigh: dict[tuple[str, str], str] = {}

    @staticmethod
    def _cp(rc: int = 0, out: str = "", err: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess([], rc, out, err)

    def ip(self, *args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        a = list(args)
        self.log.append(tuple(a))
        cp = self._ip(a)
        if check and cp.returncode:
            raise AssertionError(f"fake ip failed: {a} {cp.stderr}")
        return cp

    def _ip(self, a: list[str]) -> subprocess.CompletedProcess[str]:
        if a[:4] == ["-d", "-j", "link", "show"]:
            name = a[5]
            if name not in self.links:
                return self._cp(1, err=f'Device "{name}" does not exist.')
            link = self.links[name]
            return self._cp(out=json.dumps([{"ifname": name, "mtu": link["mtu"], "flags": link["flags"],
                                             "linkinfo": {"info_kind": "vxlan", "info_data": link["info"]}}]))
        if a[:2] == ["link", "add"]:
            name = a[2]
            assert name not in self.links
            kv = dict(zip(a[5::2], a[6::2]))
            self.links[name] = {"mtu": 1500, "flags": ["BROADCAST"], "info": {
                "id": int(kv["id"]), "local": kv["local"], "remote": kv["remote"], "port": int(kv["dstport"]),
                "learning": "nolearning" not in a}}
            return self._cp()
        if a[:3] == ["link", "set", "dev"]:
            link = self.links[a[3]]
            if a[4:] == ["up"]:
                link["flags"] = ["BROADCAST", "UP"]
            elif "mtu" in a:
                link["mtu"] = int(a[a.index("mtu") + 1])
            return self._cp()
        if a[:3] == ["link", "del", "dev"]:
            if a[3] not in self.links:
                return self._cp(1, err=f'Cannot find device "{a[3]}"')
            del self.links[a[3]]
            self.routes = {k: v for k, v in self.routes.items() if v != a[3]}
            return self._cp()
        if a[:2] == ["neigh", "replace"]:
            self.neigh[(a[2], a[6])] = a[4]
            return self._cp()
        if a[:2] == ["route", "replace"]:
            self.routes[a[2]] = a[4]
            return self._cp()
        if a[:2] == ["route", "del"]:
            if self.routes.get(a[2]) != a[4]:
                return self._cp(2, err="RTNETLINK answers: No such process")
            del self.routes[a[2]]
            return self._cp()
        if a[:2] == ["addr", "replace"]:
            return self._cp()
        raise AssertionError(f"unexpected ip {a}")

    def ip_json(self, *args: str, netns: str | None = None) -> list[Any]:
        a = list(args)
        self.log.append(("-j", *a))
        if a[:2] == ["route", "get"]:
            return [{"dst": a[2], "dev": "uplink0"}]
        if a == ["link", "show", "dev", "uplink0"]:
            return [{"ifname": "uplink0", "mtu": 1500}]
        if a[:3] == ["route", "show", "exact"]:
            dev = self.routes.get(a[3])
            return [{"dst": a[3][:-3], "dev": dev}] if dev else []
        if a[:4] == ["-d", "link", "show", "type"]:
            return [{"ifname": n, "mtu": link["mtu"], "linkinfo": {"info_kind": "vxlan", "info_data": link["info"]}}
                    for n, link in self.links.items()]
        raise AssertionError(f"unexpected ip -j {a}")

    def set_sysctls(self, settings: dict[str, str], netns: str | None = None) -> None:
        self.log.append(("sysctl", *sorted(settings)))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeIp:
    f = FakeIp()
    monkeypatch.setattr(ipcmd, "ip", f.ip)
    monkeypatch.setattr(ipcmd, "ip_json", f.ip_json)
    monkeypatch.setattr(ipcmd, "set_sysctls", f.set_sysctls)
    monkeypatch.setattr(ipcmd, "link_exists", lambda name, netns=None: name in f.links)
    return f


def _verbs(log: list[tuple[str, ...]]) -> list[str]:
    out = []
    for c in log:
        if c[0] == "sysctl":
            out.append("sysctl-ipv6" if any("ipv6" in k for k in c[1:]) else "sysctl")
        elif c[:2] == ("link", "set") and c[-1] == "up":
            out.append("up")
        elif c[0] in ("link", "neigh", "route", "addr"):
            out.append(f"{c[0]} {c[1]}")
    return out


def test_start_forwarding_order_and_idempotency(fake: FakeIp) -> None:
    fake.routes[f"{VM}/32"] = "ft12345678"  # the paused source VM's tap route
    h = fw.start_forwarding(VM, SRC, DST, netns="ns1")
    assert h == fw.ForwardingHandle(VM, "forward", "fwd-0-10", 0xC8000A, SRC, DST, 4789, 1450, "ns1")
    verbs = [v for v in _verbs(fake.log) if v != "sysctl-ipv6"]
    # sysctls before up; neighbour before the route; the route replaces the tap's
    assert verbs == ["link add", "link set", "addr replace", "sysctl", "up", "neigh replace", "route replace"]
    assert fake.routes[f"{VM}/32"] == "fwd-0-10"
    assert fake.neigh[(VM, "fwd-0-10")] == fw.forward_mac(DST)
    assert fake.links["fwd-0-10"]["mtu"] == 1450  # uplink 1500 - 50

    fake.log.clear()
    assert fw.start_forwarding(VM, SRC, DST, netns="ns1") == h
    assert "link add" not in _verbs(fake.log)  # kept

    # other endpoints (stale device): recreated
    fake.log.clear()
    fw.start_forwarding(VM, SRC, "10.201.3.2", netns="ns1")
    assert _verbs(fake.log)[:2] == ["link del", "link add"]
    assert fake.links["fwd-0-10"]["info"]["remote"] == "10.201.3.2"


def test_stop_forwarding(fake: FakeIp) -> None:
    assert fw.stop_forwarding(VM) is False  # nothing there
    h = fw.start_forwarding(VM, SRC, DST, mtu=1400)
    assert h.mtu == 1400 and fake.links["fwd-0-10"]["mtu"] == 1400
    assert fw.list_forwardings() == [h]
    assert fw.stop_forwarding(h) is True
    assert fake.links == {} and f"{VM}/32" not in fake.routes
    assert fw.stop_forwarding(VM) is False


def test_accept_and_stop_accepting(fake: FakeIp) -> None:
    fake.routes[f"{VM}/32"] = "ft12345678"  # the target's tap
    h = fw.accept_forwarding(VM, DST, SRC)
    assert h.role == "accept" and h.local_underlay == DST and h.peer_underlay == SRC
    assert fake.routes[f"{VM}/32"] == "ft12345678"  # untouched
    assert not any(c[0] in ("neigh", "route") for c in fake.log if c[0] != "-j")
    assert fake.links["fwd-0-10"]["info"]["local"] == DST
    # kept whatever its remote is: receiving demultiplexes by VNI only
    fake.log.clear()
    assert fw.accept_forwarding(VM, DST, "10.201.3.2").peer_underlay == "10.201.3.2"
    assert "link add" not in _verbs(fake.log)
    assert fw.list_forwardings()[0].role == "accept"
    assert fw.stop_accepting(VM) is True and fw.stop_accepting(VM) is False


def test_stop_accepting_keeps_a_device_that_forwards(fake: FakeIp) -> None:
    fw.accept_forwarding(VM, DST, SRC)
    fw.start_forwarding(VM, DST, "10.201.3.2")  # the VM moved on again
    assert fw.stop_accepting(VM) is False and "fwd-0-10" in fake.links
    assert fw.stop_forwarding(VM) is True and fake.links == {}


def test_failed_route_setup_removes_the_new_device(fake: FakeIp, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fake._ip

    def failing(a: list[str]) -> subprocess.CompletedProcess[str]:
        if a[:2] == ["route", "replace"]:
            return fake._cp(2, err="RTNETLINK answers: boom")
        return real(a)

    monkeypatch.setattr(fake, "_ip", failing)
    with pytest.raises(AssertionError, match="boom"):
        fw.start_forwarding(VM, SRC, DST)
    assert fake.links == {}


def test_validation_before_any_command(fake: FakeIp) -> None:
    with pytest.raises(InvalidNetValue):
        fw.start_forwarding("10.200.255.254", SRC, DST)  # the gateway
    with pytest.raises(InvalidNetValue):
        fw.accept_forwarding(VM, SRC, SRC)
    with pytest.raises(InvalidNetValue):
        fw.stop_forwarding("nope")
    assert fake.log == []

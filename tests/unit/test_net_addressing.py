"""Pure address computations of ferry.net (no root, no effects)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.net.addressing import (
    GATEWAY_IP,
    GATEWAY_MAC,
    MAX_HOSTS,
    METADATA_IP,
    VM_IP_FIRST,
    VM_IP_LAST,
    VM_SUBNET,
    LabLayout,
    allocate_vm_ip,
    in_vm_pool,
    is_vm_ip,
    pool_size,
    tap_name,
    underlay_ips,
    validate_host_name,
    validate_ifname,
    validate_mac,
    validate_prefix,
    validate_vm_ip,
    vm_mac,
)
from ferry.net.errors import AddressPoolExhausted, InvalidNetValue, NetError

vm_names = st.text(min_size=1, max_size=80)
pool_ints = st.integers(
    min_value=int(ipaddress.IPv4Address(VM_IP_FIRST)), max_value=int(ipaddress.IPv4Address(VM_IP_LAST))
)
pool_ips = pool_ints.map(lambda n: str(ipaddress.IPv4Address(n)))


def test_constants() -> None:
    net = ipaddress.IPv4Network(VM_SUBNET)
    assert ipaddress.IPv4Address(GATEWAY_IP) in net
    assert not in_vm_pool(GATEWAY_IP)
    assert validate_mac(GATEWAY_MAC) == GATEWAY_MAC
    assert int(GATEWAY_MAC[:2], 16) & 0b10  # locally administered
    assert METADATA_IP == "169.254.169.254"
    assert pool_size() == int(ipaddress.IPv4Address(VM_IP_LAST)) - int(ipaddress.IPv4Address(VM_IP_FIRST)) + 1


# ---------------------------------------------------------------- tap names and MACs


@given(vm_names)
def test_tap_name_is_short_valid_and_stable(name: str) -> None:
    t = tap_name(name)
    assert len(t) <= 15
    assert validate_ifname(t) == t
    assert t.startswith("ft") and len(t) == 10
    assert tap_name(name) == t


def test_tap_name_known_value_is_stable_across_processes() -> None:
    # sha256-based, not Python's randomised hash(): pinned so it never changes silently.
    assert tap_name("vm1") == "ft4c27dea1"
    assert vm_mac("vm1") == "52:54:00:dc:e3:45"


def test_tap_names_are_unique_enough() -> None:
    names = {tap_name(f"vm-{i}") for i in range(20000)}
    assert len(names) == 20000


@given(vm_names)
def test_vm_mac_is_stable_unicast_local(name: str) -> None:
    m = vm_mac(name)
    assert validate_mac(m) == m
    assert m.startswith("52:54:00:")
    first = int(m[:2], 16)
    assert first & 0b10 and not first & 0b01
    assert m != GATEWAY_MAC
    assert vm_mac(name) == m


@pytest.mark.parametrize("bad", ["", None, 5])
def test_vm_names_must_be_nonempty_strings(bad: object) -> None:
    with pytest.raises(InvalidNetValue):
        tap_name(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidNetValue):
        vm_mac(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- allocation


def test_allocate_lowest_free() -> None:
    assert allocate_vm_ip(set()) == VM_IP_FIRST
    assert allocate_vm_ip({"10.200.0.10", "10.200.0.11", "10.200.0.13"}) == "10.200.0.12"
    # addresses outside the pool do not matter
    assert allocate_vm_ip({"10.200.0.1", GATEWAY_IP, "192.168.1.1"}) == VM_IP_FIRST


@given(st.sets(pool_ips, max_size=200))
def test_allocate_never_returns_a_used_address(used: set[str]) -> None:
    ip = allocate_vm_ip(used)
    assert ip not in used
    assert in_vm_pool(ip) and is_vm_ip(ip)
    # it is the lowest free one
    lower = range(int(ipaddress.IPv4Address(VM_IP_FIRST)), int(ipaddress.IPv4Address(ip)))
    assert all(str(ipaddress.IPv4Address(n)) in used for n in lower)


@settings(max_examples=30)
@given(st.sets(pool_ips, min_size=1, max_size=50))
def test_allocate_sequence_is_distinct(seed: set[str]) -> None:
    used = set(seed)
    got = []
    for _ in range(20):
        ip = allocate_vm_ip(used)
        assert ip not in used
        used.add(ip)
        got.append(ip)
    assert len(set(got)) == 20


def test_allocate_exhausted_raises_clear_error() -> None:
    first = int(ipaddress.IPv4Address(VM_IP_FIRST))
    last = int(ipaddress.IPv4Address(VM_IP_LAST))
    used = {str(ipaddress.IPv4Address(n)) for n in range(first, last + 1)}
    with pytest.raises(AddressPoolExhausted, match="no free VM address") as ei:
        allocate_vm_ip(used)
    assert isinstance(ei.value, NetError)
    used.discard(VM_IP_LAST)
    assert allocate_vm_ip(used) == VM_IP_LAST


def test_allocate_rejects_garbage() -> None:
    with pytest.raises(InvalidNetValue):
        allocate_vm_ip({"not-an-ip"})


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("ip", ["10.200.0.10", "10.200.255.250", "10.200.0.1", " 10.200.1.2 "])
def test_valid_vm_ips(ip: str) -> None:
    assert validate_vm_ip(ip) == ip.strip()


@pytest.mark.parametrize(
    "ip", [GATEWAY_IP, "10.200.0.0", "10.200.255.255", "10.201.1.2", METADATA_IP, "x", "", "10.200.0.300"]
)
def test_invalid_vm_ips(ip: str) -> None:
    assert not is_vm_ip(ip)
    with pytest.raises(InvalidNetValue):
        validate_vm_ip(ip)


@pytest.mark.parametrize("name", ["eth0", "ft12345678", "a", "fab-h250", "x" * 15])
def test_valid_ifnames(name: str) -> None:
    assert validate_ifname(name) == name


@pytest.mark.parametrize("name", ["", "x" * 16, "a.b", "a/b", "a b", "tap\n"])
def test_invalid_ifnames(name: str) -> None:
    with pytest.raises(InvalidNetValue):
        validate_ifname(name)


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "52:54:00:00:00", "zz:54:00:00:00:00"])
def test_invalid_macs(mac: str) -> None:
    with pytest.raises(InvalidNetValue):
        validate_mac(mac)


def test_mac_is_normalised() -> None:
    assert validate_mac("52:54:00:AB:cd:0F") == "52:54:00:ab:cd:0f"


@pytest.mark.parametrize("prefix", ["ferry", "ft1a2b", "x"])
def test_valid_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "ferry-x", "Ferry", "1abc", "a" * 17, "a/b"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(InvalidNetValue):
        validate_prefix(prefix)
    with pytest.raises(InvalidNetValue):
        LabLayout(prefix)


@pytest.mark.parametrize("name", ["h1", "host-a", "a", "r1-rack2"])
def test_valid_host_names(name: str) -> None:
    assert validate_host_name(name) == name


@pytest.mark.parametrize("name", ["", "fabric", "client", "-a", "a-", "A", "a_b", "a.b", "a" * 49])
def test_invalid_host_names(name: str) -> None:
    with pytest.raises(InvalidNetValue):
        validate_host_name(name)


# ---------------------------------------------------------------- lab layout


def test_layout_names() -> None:
    lay = LabLayout("ferry")
    assert LabLayout() == lay
    assert lay.fabric_ns() == "ferry-fabric"
    assert lay.client_ns() == "ferry-client"
    assert lay.host_ns("h1") == "ferry-h1"
    assert lay.owns_namespace("ferry-h1") and not lay.owns_namespace("ferryx-h1")
    assert lay.uplink_veth() == "uplink0"


def test_layout_addresses() -> None:
    lay = LabLayout("ft0000")
    assert lay.host_underlay_ip(1) == "10.201.1.2"
    assert lay.host_fabric_ip(1) == "10.201.1.1"
    assert lay.host_underlay_ip(250) == "10.201.250.2"
    assert lay.client_ip() == "10.201.0.2"
    assert lay.client_fabric_ip() == "10.201.0.1"
    assert underlay_ips(0) == ("10.201.0.1", "10.201.0.2")
    for bad in (0, 251, -1, True, "1"):
        with pytest.raises(InvalidNetValue):
            lay.host_underlay_ip(bad)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=MAX_HOSTS))
def test_underlay_pairs_share_a_slash30_and_are_disjoint(index: int) -> None:
    lay = LabLayout()
    fab, mem = underlay_ips(index)
    net = ipaddress.IPv4Network(f"{fab}/30", strict=False)
    assert ipaddress.IPv4Address(mem) in net
    assert fab != mem
    assert net.network_address not in (ipaddress.IPv4Address(fab), ipaddress.IPv4Address(mem))
    assert str(net) == f"10.201.{index}.0/30"
    assert lay.index_of_underlay_ip(mem) == index
    assert lay.index_of_underlay_ip(fab) is None
    name = lay.fabric_veth(index)
    assert validate_ifname(name) == name


def test_fabric_veth_names_unique() -> None:
    lay = LabLayout()
    names = [lay.fabric_veth(i) for i in range(0, MAX_HOSTS + 1)]
    assert len(set(names)) == len(names)
    assert lay.uplink_veth() not in names


def test_plan_hosts() -> None:
    lay = LabLayout("ft1234")
    hosts = lay.plan_hosts(["a", "b"])
    assert [(h.name, h.index, h.netns, h.underlay_ip, h.fabric_ip, h.fabric_veth) for h in hosts] == [
        ("a", 1, "ft1234-a", "10.201.1.2", "10.201.1.1", "fab-h1"),
        ("b", 2, "ft1234-b", "10.201.2.2", "10.201.2.1", "fab-h2"),
    ]
    assert hosts[0].underlay_cidr == "10.201.1.2/30"
    assert hosts[0].fabric_cidr == "10.201.1.1/30"
    client = lay.client()
    assert (client.netns, client.underlay_ip, client.fabric_veth) == ("ft1234-client", "10.201.0.2", "fab-client")
    with pytest.raises(InvalidNetValue, match="duplicate"):
        lay.plan_hosts(["a", "a"])
    with pytest.raises(InvalidNetValue, match="too many"):
        lay.plan_hosts([f"h{i}" for i in range(MAX_HOSTS + 1)])
    with pytest.raises(InvalidNetValue, match="reserved"):
        lay.plan_hosts(["client"])

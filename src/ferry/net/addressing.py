"""Address plan of ferry's routed network. Pure: no effects, only computations.

Addressing plan
---------------

* VMs live in ``VM_SUBNET`` (10.200.0.0/16). Every VM address is a /32 routed
  to the host currently running the VM; guests are configured with
  ``VM_IP/32`` on eth0, an on-link route to ``GATEWAY_IP`` and a default route
  via ``GATEWAY_IP``. Allocation pool: 10.200.0.10 .. 10.200.255.250.
* ``GATEWAY_IP``/``GATEWAY_MAC`` are the same on the host side of every VM
  link on every host, so a guest sees no L2/L3 change when it moves.
* Lab underlay (``UNDERLAY_SUBNET`` 10.201.0.0/16): member *i* of the lab
  (0 = client, 1..250 = hosts) is joined to the fabric namespace by a veth pair
  on the /30 ``10.201.i.0/30``: fabric side ``10.201.i.1``, member side
  ``10.201.i.2`` (the member's default gateway is ``10.201.i.1``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ferry.net.errors import AddressPoolExhausted, InvalidNetValue

VM_SUBNET = "10.200.0.0/16"
GATEWAY_IP = "10.200.255.254"
GATEWAY_MAC = "02:66:72:72:79:01"
METADATA_IP = "169.254.169.254"

VM_IP_FIRST = "10.200.0.10"
VM_IP_LAST = "10.200.255.250"

UNDERLAY_SUBNET = "10.201.0.0/16"
UNDERLAY_PREFIXLEN = 30
CLIENT_INDEX = 0
MAX_HOSTS = 250

DEFAULT_PREFIX = "ferry"
FABRIC_NAME = "fabric"
CLIENT_NAME = "client"
RESERVED_HOST_NAMES = frozenset({FABRIC_NAME, CLIENT_NAME})
UPLINK_IF = "uplink0"  # the member-side veth in every host/client namespace
IFNAME_MAX = 15  # IFNAMSIZ - 1

TAP_PREFIX = "ft"

_VM_NET = ipaddress.IPv4Network(VM_SUBNET)
_POOL_FIRST = int(ipaddress.IPv4Address(VM_IP_FIRST))
_POOL_LAST = int(ipaddress.IPv4Address(VM_IP_LAST))
_UNDERLAY_NET = ipaddress.IPv4Network(UNDERLAY_SUBNET)

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,15}$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_HOST_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")


# --------------------------------------------------------------------------- validation


def validate_ipv4(ip: str, what: str = "address") -> str:
    """Return the canonical form of an IPv4 address or raise InvalidNetValue."""
    try:
        return str(ipaddress.IPv4Address(str(ip).strip()))
    except ValueError:
        raise InvalidNetValue(f"invalid IPv4 {what}: {ip!r}") from None


def is_vm_ip(ip: str) -> bool:
    """True if *ip* may be a VM address: inside VM_SUBNET, not the gateway,
    the subnet's network or broadcast address."""
    try:
        addr = ipaddress.IPv4Address(str(ip).strip())
    except ValueError:
        return False
    return (
        addr in _VM_NET
        and addr != _VM_NET.network_address
        and addr != _VM_NET.broadcast_address
        and str(addr) != GATEWAY_IP
    )


def validate_vm_ip(ip: str) -> str:
    """Canonical VM address, or InvalidNetValue with a one-line reason."""
    canonical = validate_ipv4(ip, "VM address")
    if not is_vm_ip(canonical):
        raise InvalidNetValue(
            f"{canonical} is not a usable VM address (must be in {VM_SUBNET}, not {GATEWAY_IP})"
        )
    return canonical


def in_vm_pool(ip: str) -> bool:
    """True if *ip* is inside the allocation pool VM_IP_FIRST..VM_IP_LAST."""
    try:
        n = int(ipaddress.IPv4Address(str(ip).strip()))
    except ValueError:
        return False
    return _POOL_FIRST <= n <= _POOL_LAST


def pool_size() -> int:
    return _POOL_LAST - _POOL_FIRST + 1


def validate_ifname(name: str) -> str:
    """An interface name the kernel accepts and that is safe in a sysctl key
    (no '.', '/', whitespace): 1..15 chars of [A-Za-z0-9_-]."""
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name):
        raise InvalidNetValue(f"invalid interface name {name!r} (1-15 chars of A-Z a-z 0-9 _ -)")
    return name


def validate_mac(mac: str) -> str:
    """Canonical lower-case unicast MAC, or InvalidNetValue."""
    m = str(mac).strip().lower()
    if not _MAC_RE.fullmatch(m):
        raise InvalidNetValue(f"invalid MAC address {mac!r}")
    if int(m[:2], 16) & 1:
        raise InvalidNetValue(f"MAC address {mac!r} is multicast")
    return m


def validate_prefix(prefix: str) -> str:
    """Lab prefix: a lower-case letter then up to 15 of [a-z0-9]. No '-': the
    lab owns every namespace named ``{prefix}-*``, so a prefix containing '-'
    could claim another lab's namespaces ("ferry" vs "ferry-x")."""
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise InvalidNetValue(
            f"invalid lab prefix {prefix!r} (a lower-case letter then up to 15 of a-z 0-9, no '-')"
        )
    return prefix


def validate_host_name(name: str) -> str:
    """Lab host name: a DNS-label-like name, not a reserved member name."""
    if not isinstance(name, str) or not _HOST_RE.fullmatch(name):
        raise InvalidNetValue(
            f"invalid host name {name!r} (1-48 chars of a-z 0-9 '-', not starting/ending with '-')"
        )
    if name in RESERVED_HOST_NAMES:
        raise InvalidNetValue(f"host name {name!r} is reserved")
    return name


def validate_vm_name(vm_name: str) -> str:
    if not isinstance(vm_name, str) or not vm_name:
        raise InvalidNetValue(f"invalid VM name {vm_name!r} (must be a non-empty string)")
    return vm_name


def validate_host_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= MAX_HOSTS:
        raise InvalidNetValue(f"invalid host index {index!r} (must be 1..{MAX_HOSTS})")
    return index


# --------------------------------------------------------------------------- VM names


def _digest(domain: str, name: str) -> bytes:
    return hashlib.sha256(f"ferry:{domain}:{name}".encode()).digest()


def tap_name(vm_name: str) -> str:
    """Stable host-side interface name of a VM: ``ft`` + 8 hex digits (10 chars)."""
    validate_vm_name(vm_name)
    return TAP_PREFIX + _digest("tap", vm_name).hex()[:8]


def vm_mac(vm_name: str) -> str:
    """Stable guest MAC ``52:54:00:xx:xx:xx`` (locally administered, unicast).

    24 bits of hash: collisions across a large fleet are possible and harmless,
    because every VM link is point-to-point (only the gateway and the one guest
    on it)."""
    validate_vm_name(vm_name)
    b = _digest("mac", vm_name)
    return f"52:54:00:{b[0]:02x}:{b[1]:02x}:{b[2]:02x}"


def allocate_vm_ip(used: Iterable[str]) -> str:
    """Lowest address of the pool (VM_IP_FIRST..VM_IP_LAST) not in *used*.

    Entries of *used* outside the pool are ignored; invalid entries raise
    InvalidNetValue. Raises AddressPoolExhausted when every address is taken."""
    taken: set[int] = set()
    for u in used:
        taken.add(int(ipaddress.IPv4Address(validate_ipv4(u, "address in use"))))
    for n in range(_POOL_FIRST, _POOL_LAST + 1):
        if n not in taken:
            return str(ipaddress.IPv4Address(n))
    raise AddressPoolExhausted(
        f"no free VM address left in {VM_IP_FIRST}..{VM_IP_LAST} ({pool_size()} addresses, all in use)"
    )


# --------------------------------------------------------------------------- lab layout


def underlay_ips(index: int) -> tuple[str, str]:
    """(fabric side, member side) addresses of the /30 of lab member *index*
    (0 = client, 1..MAX_HOSTS = hosts)."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_HOSTS:
        raise InvalidNetValue(f"invalid lab member index {index!r} (must be 0..{MAX_HOSTS})")
    base = int(_UNDERLAY_NET.network_address) + (index << 8)
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


@dataclass(frozen=True)
class LabMember:
    """One namespace joined to the lab fabric (a host, or the client)."""

    name: str  # host name, or "client"
    index: int  # 0 = client, 1.. = hosts
    netns: str
    underlay_ip: str  # member side of the /30 (the host's underlay address)
    fabric_ip: str  # fabric side of the /30 (the member's default gateway)
    fabric_veth: str  # veth name inside the fabric namespace
    uplink_veth: str = UPLINK_IF  # veth name inside the member namespace

    @property
    def underlay_cidr(self) -> str:
        return f"{self.underlay_ip}/{UNDERLAY_PREFIXLEN}"

    @property
    def fabric_cidr(self) -> str:
        return f"{self.fabric_ip}/{UNDERLAY_PREFIXLEN}"


# A lab host is a lab member with index >= 1.
LabHost = LabMember


@dataclass(frozen=True)
class LabLayout:
    """Names and addresses of a lab whose namespaces all start with ``{prefix}-``."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    def ns_prefix(self) -> str:
        return f"{self.prefix}-"

    def owns_namespace(self, netns: str) -> bool:
        return netns.startswith(self.ns_prefix())

    def fabric_ns(self) -> str:
        return f"{self.prefix}-{FABRIC_NAME}"

    def client_ns(self) -> str:
        return f"{self.prefix}-{CLIENT_NAME}"

    def host_ns(self, host_name: str) -> str:
        return f"{self.prefix}-{validate_host_name(host_name)}"

    def host_underlay_ip(self, index: int) -> str:
        return underlay_ips(validate_host_index(index))[1]

    def host_fabric_ip(self, index: int) -> str:
        return underlay_ips(validate_host_index(index))[0]

    def client_ip(self) -> str:
        return underlay_ips(CLIENT_INDEX)[1]

    def client_fabric_ip(self) -> str:
        return underlay_ips(CLIENT_INDEX)[0]

    def fabric_veth(self, index: int) -> str:
        """Name, inside the fabric namespace, of the veth toward member *index*."""
        underlay_ips(index)  # validates
        return "fab-client" if index == CLIENT_INDEX else f"fab-h{index}"

    def uplink_veth(self) -> str:
        """Name, inside every host/client namespace, of its veth to the fabric."""
        return UPLINK_IF

    def host(self, host_name: str, index: int) -> LabMember:
        fabric_ip, underlay_ip = underlay_ips(validate_host_index(index))
        return LabMember(
            name=host_name,
            index=index,
            netns=self.host_ns(host_name),
            underlay_ip=underlay_ip,
            fabric_ip=fabric_ip,
            fabric_veth=self.fabric_veth(index),
        )

    def client(self) -> LabMember:
        fabric_ip, underlay_ip = underlay_ips(CLIENT_INDEX)
        return LabMember(
            name=CLIENT_NAME,
            index=CLIENT_INDEX,
            netns=self.client_ns(),
            underlay_ip=underlay_ip,
            fabric_ip=fabric_ip,
            fabric_veth=self.fabric_veth(CLIENT_INDEX),
        )

    def plan_hosts(self, hosts: Iterable[str]) -> list[LabMember]:
        """Hosts numbered 1.. in the order given; validates names, duplicates, count."""
        names = list(hosts)
        for n in names:
            validate_host_name(n)
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise InvalidNetValue(f"duplicate host name(s): {', '.join(dups)}")
        if len(names) > MAX_HOSTS:
            raise InvalidNetValue(f"too many hosts: {len(names)} (at most {MAX_HOSTS})")
        return [self.host(n, i) for i, n in enumerate(names, start=1)]

    def index_of_underlay_ip(self, ip: str) -> int | None:
        """Member index whose member-side underlay address is *ip*, else None."""
        try:
            addr = ipaddress.IPv4Address(str(ip).strip())
        except ValueError:
            return None
        if addr not in _UNDERLAY_NET:
            return None
        off = int(addr) - int(_UNDERLAY_NET.network_address)
        index, low = off >> 8, off & 0xFF
        if low != 2 or index > MAX_HOSTS:
            return None
        return index

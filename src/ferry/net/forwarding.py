"""Post-migration forwarding: the source host tunnels a migrated VM's packets to the target.

After a live migration the VM runs on the target host, but the fabric keeps
routing ``VM_IP/32`` to the source until the route update has propagated (see
``LabFabric(propagation_delay_s=...)``). During that brownout the source
forwards whatever arrives for VM_IP through a VXLAN tunnel to the target,
which delivers it to the VM's tap. Replies leave the target normally (its
default route via the fabric), so the path is asymmetric and nothing in the
guest or at the client changes: established TCP connections survive.

Called by the host agents, each in its own namespace (on a real host: the
root namespace), so every function takes ``netns`` (None = current namespace,
else ``ip -n NETNS``), like :mod:`ferry.net.vmnet`.

One VXLAN device per forwarded VM, on both hosts
------------------------------------------------

=========  ================================================================
name       ``fwd-X-Y`` for VM ``10.200.X.Y`` (at most 11 characters)
VNI        the low 24 bits of the VM address (``200<<16 | X<<8 | Y``):
           unique per VM, and both ends compute it without talking
MAC        ``02:66:`` + the 4 bytes of the owning host's underlay address,
           so each end knows the other's MAC (and they always differ: the
           VXLAN driver drops frames whose source MAC is its own)
endpoints  ``local`` = own underlay address, ``remote`` = the peer's,
           ``dstport 4789``, ``nolearning``. ``remote`` installs the default
           FDB entry (``00:00:00:00:00:00 dst PEER``): no ``bridge fdb`` needed
MTU        MTU of the underlay link towards the peer minus 50 (outer IPv4 +
           UDP + VXLAN + inner Ethernet), unless given
address    the host's own underlay address as a /32 (see reverse-path
           filtering below; also the source address the host itself uses
           towards the VM through the tunnel, so replies come back to it)
sysctls    ``rp_filter=2`` (loose; see below), ``send_redirects=0``,
           ``ip_forward=1``, IPv6 off on the device (no ND/MLD chatter)
=========  ================================================================

A device per VM (rather than per peer host) keeps every VM independent: no
reference counting, no shared FDB, no races between concurrent migrations of
different VMs, and the target accepts only the VNI of the VMs it expects.

Source (:func:`start_forwarding`)::

    ip link add fwd-X-Y type vxlan id VNI local SRC remote DST dstport 4789 nolearning
    ip link set dev fwd-X-Y address 02:66:<SRC> mtu M
    ip addr replace SRC/32 dev fwd-X-Y ; sysctls ; ip link set dev fwd-X-Y up
    ip neigh replace VM_IP lladdr 02:66:<DST> dev fwd-X-Y nud permanent   # never ARP over the tunnel
    ip route replace VM_IP/32 dev fwd-X-Y scope link

``route replace`` takes over the VM's route whether or not its tap still
exists (a source VM paused in ``postmigrate`` keeps its tap and route until it
is deleted; the replace wins at once, and deleting the tap later does not touch
the tunnel route). The static neighbour is added before the route, so the
first forwarded packet already has its destination MAC.

Target (:func:`accept_forwarding`): the same device with ``local DST remote
SRC`` and MAC ``02:66:<DST>``, so decapsulated frames are addressed to it
(PACKET_HOST) and the kernel routes them by the target's existing
``VM_IP/32 dev TAP``. No route changes on the target.

Reverse-path filtering: decapsulated packets carry client source addresses
whose route is the uplink, so strict mode (1) drops them. The kernel applies
``max(conf.all.rp_filter, conf.DEV.rp_filter)``, so 0 on the device would
still be strict on a host with ``all=1``; loose mode (2) wins over 0, 1 and 2
and passes, because the target has a route back to the client (it needs one
for its replies anyway). But any rp_filter other than 0 drops every packet
received on a device *without an IPv4 address* whose source is not routed
through that device (``no_addr`` in ``__fib_validate_source``), hence the
underlay /32 on the device (only a local route: the /30 stays on the uplink).

Order of a brownout (the caller, i.e. the agents/migrator)::

    target: accept_forwarding(vm, target_underlay, source_underlay)   # before the VM resumes there
    source: start_forwarding(vm, source_underlay, target_underlay)    # as soon as the target runs
    fabric: announce(vm, target) ... propagates ...
    source: stop_forwarding(vm)      # once the fabric routes to the target (or after a hold time)
    target: stop_accepting(vm)

Stopping the source while the fabric still routes to it loops the VM's packets
between the source's default route and the fabric until their TTL runs out.
Full-size (1500-byte) packets do not fit the tunnel over a 1500-byte underlay:
the source answers them with ICMP "fragmentation needed" (PMTU discovery then
shrinks them); an underlay MTU of at least 1550 makes forwarding transparent.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ferry.net import ipcmd
from ferry.net.addressing import validate_ifname, validate_ipv4, validate_vm_ip
from ferry.net.errors import InvalidNetValue, NetCommandError, NetError

FORWARD_PORT = 4789  # IANA VXLAN port
FORWARD_IF_PREFIX = "fwd-"
FORWARD_MAC_PREFIX = "02:66"  # locally administered, unicast
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
MIN_TUNNEL_MTU = 576

Role = Literal["forward", "accept"]


@dataclass(frozen=True)
class ForwardingHandle:
    """A forwarding tunnel of one VM on one host (what start/accept set up)."""

    vm_ip: str
    role: Role  # "forward" (source: VM route into the tunnel) or "accept" (target)
    ifname: str
    vni: int
    local_underlay: str
    peer_underlay: str
    port: int = FORWARD_PORT
    mtu: int | None = None
    netns: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- pure


def forward_ifname(vm_ip: str) -> str:
    """Name of the tunnel device of a VM: ``fwd-X-Y`` for ``10.200.X.Y``."""
    b = ipaddress.IPv4Address(validate_vm_ip(vm_ip)).packed
    return validate_ifname(f"{FORWARD_IF_PREFIX}{b[2]}-{b[3]}")


def forward_vni(vm_ip: str) -> int:
    """VXLAN network identifier of a VM's tunnel: the low 24 bits of its address."""
    return int(ipaddress.IPv4Address(validate_vm_ip(vm_ip))) & 0xFFFFFF


def vm_ip_of_vni(vni: int) -> str | None:
    """The VM address whose tunnel has *vni* (inverse of :func:`forward_vni`), or None."""
    if isinstance(vni, bool) or not isinstance(vni, int) or not 0 <= vni <= 0xFFFFFF:
        return None
    ip = str(ipaddress.IPv4Address((10 << 24) | vni))
    try:
        return validate_vm_ip(ip)
    except InvalidNetValue:
        return None


def forward_mac(underlay_ip: str) -> str:
    """MAC of the tunnel devices on the host with this underlay address."""
    b = ipaddress.IPv4Address(validate_ipv4(underlay_ip, "underlay address")).packed
    return FORWARD_MAC_PREFIX + "".join(f":{x:02x}" for x in b)


def _validate_endpoints(local_underlay: str, peer_underlay: str, port: int) -> tuple[str, str, int]:
    local = validate_ipv4(local_underlay, "local underlay address")
    peer = validate_ipv4(peer_underlay, "peer underlay address")
    if local == peer:
        raise InvalidNetValue(f"forwarding needs two different hosts (local and peer are both {local})")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidNetValue(f"invalid VXLAN UDP port {port!r} (1..65535)")
    return local, peer, port


def _validate_mtu(mtu: int) -> int:
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_TUNNEL_MTU <= mtu <= 65535:
        raise InvalidNetValue(f"invalid tunnel MTU {mtu!r} ({MIN_TUNNEL_MTU}..65535)")
    return mtu


def tunnel_link_commands(vm_ip: str, local_underlay: str, peer_underlay: str, *,
                         port: int = FORWARD_PORT, mtu: int = 1500 - VXLAN_OVERHEAD) -> list[list[str]]:
    """``ip`` argument lists (without ``ip [-n NS]``) that create a VM's tunnel
    device on the host whose underlay address is *local_underlay* (pure). The
    device is left down: apply :func:`tunnel_sysctls`, then set it up."""
    vm = validate_vm_ip(vm_ip)
    local, peer, port = _validate_endpoints(local_underlay, peer_underlay, port)
    name = forward_ifname(vm)
    return [
        ["link", "add", name, "type", "vxlan", "id", str(forward_vni(vm)),
         "local", local, "remote", peer, "dstport", str(port), "nolearning"],
        ["link", "set", "dev", name, "address", forward_mac(local), "mtu", str(_validate_mtu(mtu))],
        # an IPv4 address on the device, else any rp_filter != 0 drops what it receives
        ["addr", "replace", f"{local}/32", "dev", name],
    ]


def tunnel_sysctls(ifname: str) -> dict[str, str]:
    """Sysctls of a tunnel device (pure); see the module docstring for rp_filter=2."""
    validate_ifname(ifname)
    c = f"net.ipv4.conf.{ifname}"
    return {
        "net.ipv4.ip_forward": "1",
        f"{c}.rp_filter": "2",
        f"{c}.send_redirects": "0",
        f"{c}.accept_redirects": "0",
    }


def forward_route_commands(vm_ip: str, peer_underlay: str) -> list[list[str]]:
    """Source side (pure): static neighbour (the target device's MAC), then the
    VM's /32 into the tunnel. ``replace``: idempotent, and takes the route over
    from the VM's tap if that still exists."""
    vm = validate_vm_ip(vm_ip)
    name = forward_ifname(vm)
    return [
        ["neigh", "replace", vm, "lladdr", forward_mac(peer_underlay), "dev", name, "nud", "permanent"],
        ["route", "replace", f"{vm}/32", "dev", name, "scope", "link"],
    ]


def stop_forwarding_commands(vm_ip: str) -> list[list[str]]:
    """Source side teardown (pure): the tunnel route, then the device (with its neighbour)."""
    vm = validate_vm_ip(vm_ip)
    name = forward_ifname(vm)
    return [["route", "del", f"{vm}/32", "dev", name], ["link", "del", "dev", name]]


# --------------------------------------------------------------------------- effects


def start_forwarding(vm_ip: str, local_underlay: str, peer_underlay: str, netns: str | None = None,
                     *, port: int = FORWARD_PORT, mtu: int | None = None) -> ForwardingHandle:
    """Source side: from now on, packets for *vm_ip* that reach this host go
    through a VXLAN tunnel to the host at *peer_underlay* (which must
    :func:`accept_forwarding` them). Idempotent; replaces the VM's tap route."""
    vm = validate_vm_ip(vm_ip)
    local, peer, port = _validate_endpoints(local_underlay, peer_underlay, port)
    name = forward_ifname(vm)
    created, used_mtu = _ensure_tunnel(vm, local, peer, port, mtu, netns, keep_any_remote=False)
    try:
        for c in forward_route_commands(vm, peer):
            ipcmd.ip(*c, netns=netns)
    except BaseException:
        if created:
            _delete_link(name, netns)
        raise
    return ForwardingHandle(vm, "forward", name, forward_vni(vm), local, peer, port, used_mtu, netns)


def prepare_forwarding(vm_ip: str, local_underlay: str, peer_underlay: str, netns: str | None = None,
                       *, port: int = FORWARD_PORT, mtu: int | None = None) -> ForwardingHandle:
    """Source side, ahead of time: the tunnel device and the target's neighbour entry, but
    not yet the route, so that `activate_forwarding` at the switchover is one route change."""
    vm = validate_vm_ip(vm_ip)
    local, peer, port = _validate_endpoints(local_underlay, peer_underlay, port)
    name = forward_ifname(vm)
    _, used_mtu = _ensure_tunnel(vm, local, peer, port, mtu, netns, keep_any_remote=False)
    ipcmd.ip(*forward_route_commands(vm, peer)[0], netns=netns)
    return ForwardingHandle(vm, "forward", name, forward_vni(vm), local, peer, port, used_mtu, netns)


def activate_forwarding(vm_ip: str, netns: str | None = None) -> None:
    """Source side, at the switchover: the VM's /32 into the prepared tunnel."""
    vm = validate_vm_ip(vm_ip)
    ipcmd.ip("route", "replace", f"{vm}/32", "dev", forward_ifname(vm), "scope", "link", netns=netns)


def stop_forwarding(vm: str | ForwardingHandle, netns: str | None = None) -> bool:
    """Source side: remove the VM's tunnel route and device. Idempotent: False
    if there was nothing to remove. Does not restore a tap route (rollbacks
    happen before forwarding starts)."""
    vm_ip, netns = _target(vm, netns)
    name = forward_ifname(vm_ip)
    route_del, _ = stop_forwarding_commands(vm_ip)
    cp = ipcmd.ip(*route_del, netns=netns, check=False)
    removed = cp.returncode == 0
    if not removed and not _is_missing(cp.stderr):
        raise NetCommandError(ipcmd.ip_argv(netns, *route_del), cp.returncode, cp.stderr)
    return _delete_link(name, netns) or removed


def accept_forwarding(vm_ip: str, local_underlay: str, peer_underlay: str, netns: str | None = None,
                      *, port: int = FORWARD_PORT, mtu: int | None = None) -> ForwardingHandle:
    """Target side: receive the VM's packets tunnelled by the host at
    *peer_underlay* and deliver them by this host's ``VM_IP/32 dev TAP`` route.
    Idempotent. Call it before the source starts forwarding."""
    vm = validate_vm_ip(vm_ip)
    local, peer, port = _validate_endpoints(local_underlay, peer_underlay, port)
    _, used_mtu = _ensure_tunnel(vm, local, peer, port, mtu, netns, keep_any_remote=True)
    return ForwardingHandle(vm, "accept", forward_ifname(vm), forward_vni(vm), local, peer, port,
                            used_mtu, netns)


def stop_accepting(vm: str | ForwardingHandle, netns: str | None = None) -> bool:
    """Target side: delete the VM's tunnel device. Idempotent: False if it did
    not exist, or if this host also forwards the VM onwards through it (the VM
    moved on again: the route uses the device; :func:`stop_forwarding` ends it)."""
    vm_ip, netns = _target(vm, netns)
    name = forward_ifname(vm_ip)
    if _route_dev(vm_ip, netns) == name:
        return False
    return _delete_link(name, netns)


def list_forwardings(netns: str | None = None) -> list[ForwardingHandle]:
    """Tunnels present on this host (e.g. left over by an agent that restarted)."""
    found: list[ForwardingHandle] = []
    for link in ipcmd.ip_json("-d", "link", "show", "type", "vxlan", netns=netns):
        name = str(link.get("ifname", ""))
        info = (link.get("linkinfo") or {}).get("info_data") or {}
        vm_ip = vm_ip_of_vni(info.get("id"))
        if not name.startswith(FORWARD_IF_PREFIX) or vm_ip is None or forward_ifname(vm_ip) != name:
            continue
        role: Role = "forward" if _route_dev(vm_ip, netns) == name else "accept"
        found.append(ForwardingHandle(vm_ip, role, name, int(info["id"]), str(info.get("local", "")),
                                      str(info.get("remote", "")), int(info.get("port", FORWARD_PORT)),
                                      link.get("mtu"), netns))
    return sorted(found, key=lambda h: ipaddress.IPv4Address(h.vm_ip))


def forwarding_counters(vm: str | ForwardingHandle, netns: str | None = None) -> dict[str, int] | None:
    """Packet/byte counters of a VM's tunnel device (tx on the source: packets
    forwarded; rx on the target: packets delivered), or None without a tunnel."""
    vm_ip, netns = _target(vm, netns)
    name = forward_ifname(vm_ip)
    if not ipcmd.link_exists(name, netns):
        return None
    (link,) = ipcmd.ip_json("-s", "link", "show", "dev", name, netns=netns)
    stats = link.get("stats64") or link.get("stats") or {}
    out: dict[str, int] = {}
    for direction in ("rx", "tx"):
        for key in ("packets", "bytes", "dropped", "errors"):
            out[f"{direction}_{key}"] = int((stats.get(direction) or {}).get(key, 0))
    return out


def lower_mtu(peer_underlay: str, netns: str | None = None) -> int:
    """MTU of the link this host uses to reach *peer_underlay*."""
    peer = validate_ipv4(peer_underlay, "peer underlay address")
    routes = ipcmd.ip_json("route", "get", peer, netns=netns)
    dev = routes[0].get("dev") if routes else None
    if not dev:
        raise NetError(f"no route to the peer host {peer}")
    (link,) = ipcmd.ip_json("link", "show", "dev", str(dev), netns=netns)
    return int(link["mtu"])


# --------------------------------------------------------------------------- internals


def _target(vm: str | ForwardingHandle, netns: str | None) -> tuple[str, str | None]:
    if isinstance(vm, ForwardingHandle):
        return vm.vm_ip, vm.netns if netns is None else netns
    return validate_vm_ip(vm), netns


def _is_missing(stderr: str) -> bool:
    return any(s in stderr for s in ("No such process", "Cannot find device", "does not exist"))


def _vxlan_info(name: str, netns: str | None) -> dict[str, Any] | None:
    """``info_data`` of the VXLAN device *name*, None if there is no such device."""
    cp = ipcmd.ip("-d", "-j", "link", "show", "dev", name, netns=netns, check=False)
    if cp.returncode != 0:
        if _is_missing(cp.stderr):
            return None
        raise NetCommandError(ipcmd.ip_argv(netns, "-d", "-j", "link", "show", "dev", name),
                              cp.returncode, cp.stderr)
    (link,) = json.loads(cp.stdout)
    linkinfo = link.get("linkinfo") or {}
    if linkinfo.get("info_kind") != "vxlan":
        raise NetError(f"interface {name} exists and is not a VXLAN device ({linkinfo.get('info_kind')})")
    info = dict(linkinfo.get("info_data") or {})
    info["_mtu"] = link.get("mtu")
    info["_up"] = "UP" in (link.get("flags") or [])
    return info


def _ensure_tunnel(vm: str, local: str, peer: str, port: int, mtu: int | None, netns: str | None,
                   *, keep_any_remote: bool) -> tuple[bool, int]:
    """Create (or keep) the VM's tunnel device, up. Returns (created, mtu).

    An existing device with the same VNI and port is kept if its endpoints
    match, or (target side, *keep_any_remote*) whatever they are: receiving
    demultiplexes by VNI only, and the device may be forwarding the VM onwards.
    Otherwise it is recreated."""
    name = forward_ifname(vm)
    info = _vxlan_info(name, netns)
    if info is not None:
        same_vni = info.get("id") == forward_vni(vm) and info.get("port") == port
        same_ends = info.get("local") == local and info.get("remote") == peer
        if same_vni and (same_ends or keep_any_remote):
            if not info["_up"]:
                ipcmd.ip("link", "set", "dev", name, "up", netns=netns)
            return False, int(info["_mtu"])
        _delete_link(name, netns)
    if mtu is None:
        mtu = max(MIN_TUNNEL_MTU, lower_mtu(peer, netns) - VXLAN_OVERHEAD)
    cmds = tunnel_link_commands(vm, local, peer, port=port, mtu=mtu)
    ipcmd.ip(*cmds[0], netns=netns)
    try:
        for c in cmds[1:]:
            ipcmd.ip(*c, netns=netns)
        ipcmd.set_sysctls(tunnel_sysctls(name), netns)
        _disable_ipv6(name, netns)
        ipcmd.ip("link", "set", "dev", name, "up", netns=netns)
    except BaseException:
        _delete_link(name, netns)
        raise
    return True, mtu


def _disable_ipv6(name: str, netns: str | None) -> None:
    """No IPv6 on the device (no link-local address, so no ND/MLD through the
    tunnel). Best effort: a kernel without IPv6 has nothing to switch off."""
    if not os.path.isdir("/proc/sys/net/ipv6"):
        return
    try:
        ipcmd.set_sysctls({f"net.ipv6.conf.{name}.disable_ipv6": "1"}, netns)
    except NetCommandError:
        pass


def _delete_link(name: str, netns: str | None) -> bool:
    cp = ipcmd.ip("link", "del", "dev", name, netns=netns, check=False)
    if cp.returncode == 0:
        return True
    if _is_missing(cp.stderr):
        return False
    raise NetCommandError(ipcmd.ip_argv(netns, "link", "del", "dev", name), cp.returncode, cp.stderr)


def _route_dev(vm_ip: str, netns: str | None) -> str | None:
    """Device of the VM's /32 route in the main table (None: no such route)."""
    for r in ipcmd.ip_json("route", "show", "exact", f"{vm_ip}/32", netns=netns):
        if r.get("dev"):
            return str(r["dev"])
    return None

"""Host side of a VM's network. Called by the host agent inside its own
namespace (on a real host: the root namespace), so every function takes
``netns`` (None = current namespace, else ``ip -n NETNS``).

Point-to-point routed VM links
------------------------------

Each VM has its own link (a tap for QEMU, or a veth for a stand-in guest):

* host side: MAC ``GATEWAY_MAC``, address ``GATEWAY_IP/32``, route
  ``VM_IP/32 dev LINK``. The same gateway MAC and IP are on every VM link of
  every host, so after a migration the guest's ARP entry for its gateway is
  still right and it needs no gratuitous ARP from anyone.
* guest side (configured inside the guest, e.g. by cloud-init or a boot
  script, see :func:`guest_network_commands`)::

      ip addr add VM_IP/32 dev eth0
      ip link set eth0 up
      ip route add GATEWAY_IP dev eth0 scope link
      ip route add default via GATEWAY_IP dev eth0

  so the only address the guest ever ARPs for is the gateway's.

ARP: the gateway address is a local address of the link the request arrives
on, so the kernel answers it with that link's MAC (GATEWAY_MAC) under any
``arp_ignore`` of 0..2; having the same /32 on several taps of one namespace
is fine (the local-table entry survives the deletion of any one of them).
Proxy ARP is not needed because a /32 guest only ARPs for the gateway; it is
left off so the host never answers for other addresses on the link.
"""

from __future__ import annotations

from ferry.net import ipcmd
from ferry.net.addressing import (
    GATEWAY_IP,
    GATEWAY_MAC,
    METADATA_IP,
    validate_ifname,
    validate_mac,
    validate_vm_ip,
)
from ferry.net.errors import NetCommandError


def vm_link_sysctls(ifname: str) -> dict[str, str]:
    """Sysctls for the host side of a VM link (pure).

    * ``ip_forward=1``: the host routes between the VM link and its uplink.
    * ``rp_filter=1`` (strict) on the VM link: a guest may only send from its
      own address (the only address routed to this link): anti-spoofing for free.
      The kernel uses max(all, link), so a namespace-wide loose (2) setting
      weakens it to loose; 0 on all/default (lab hosts) keeps it strict.
    * ``arp_ignore=0``: answer ARP for any local address, so a guest that adds
      an on-link 169.254.0.0/16 route (zeroconf) still reaches METADATA_IP on lo.
    * ``arp_announce=2``: ARP requests the host sends to the guest carry the
      gateway address as sender (never e.g. the metadata or underlay address).
    * ``send_redirects=0``, ``proxy_arp=0``: the link is point-to-point.
    """
    validate_ifname(ifname)
    c = f"net.ipv4.conf.{ifname}"
    return {
        "net.ipv4.ip_forward": "1",
        f"{c}.rp_filter": "1",
        f"{c}.arp_ignore": "0",
        f"{c}.arp_announce": "2",
        f"{c}.send_redirects": "0",
        f"{c}.proxy_arp": "0",
    }


def vm_link_commands(ifname: str, vm_ip: str, vm_mac: str | None = None) -> list[list[str]]:
    """``ip`` argument lists (without ``ip [-n NS]``) that configure the host
    side of a VM link; pure. Every command is idempotent."""
    validate_ifname(ifname)
    vm = validate_vm_ip(vm_ip)
    cmds = [
        ["link", "set", "dev", ifname, "address", GATEWAY_MAC],
        ["link", "set", "dev", ifname, "up"],
        ["addr", "replace", f"{GATEWAY_IP}/32", "dev", ifname],
        ["route", "replace", f"{vm}/32", "dev", ifname, "scope", "link"],
    ]
    if vm_mac is not None:
        # Static neighbour: the host never has to ARP for the guest (e.g. right
        # after a migration, when the first packets arrive on the target).
        cmds.append(["neigh", "replace", vm, "lladdr", validate_mac(vm_mac),
                     "dev", ifname, "nud", "permanent"])
    return cmds


def configure_vm_link(ifname: str, vm_ip: str, netns: str | None = None,
                      *, vm_mac: str | None = None) -> None:
    """Configure the host side of an existing VM link (tap or veth) for *vm_ip*."""
    cmds = vm_link_commands(ifname, vm_ip, vm_mac)
    # sysctls before the link goes up, so the first ARP/packet already sees them
    ipcmd.run(ipcmd.ip_argv(netns, *cmds[0]))
    ipcmd.set_sysctls(vm_link_sysctls(ifname), netns)
    for c in cmds[1:]:
        ipcmd.run(ipcmd.ip_argv(netns, *c))


def create_vm_tap(tap: str, vm_ip: str, netns: str | None = None,
                  *, vm_mac: str | None = None, owner: int | None = 0) -> None:
    """(Re)create persistent tap *tap* for the VM with address *vm_ip*.

    The tap is owned by uid *owner* (default root; None = no owner, any process
    with CAP_NET_ADMIN); QEMU attaches to it with
    ``-netdev tap,id=...,ifname=TAP,script=no,downscript=no`` and must run in
    the same network namespace. Idempotent: an existing link of that name is
    deleted first (do not call it for a tap a running VM is attached to).
    A tap without QEMU attached has no carrier; its route is kept ("linkdown")."""
    validate_ifname(tap)
    validate_vm_ip(vm_ip)
    delete_vm_tap(tap, netns)
    args = ["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]
    if owner is not None:
        args += ["user", str(int(owner))]
    ipcmd.ip(*args, netns=netns)
    try:
        configure_vm_link(tap, vm_ip, netns, vm_mac=vm_mac)
    except BaseException:
        delete_vm_tap(tap, netns)
        raise


def delete_vm_tap(tap: str, netns: str | None = None) -> bool:
    """Delete the VM link *tap* (tap or veth) with its address and route.
    Idempotent: returns False if it did not exist."""
    validate_ifname(tap)
    if not ipcmd.link_exists(tap, netns):
        return False
    cp = ipcmd.ip("link", "del", "dev", tap, netns=netns, check=False)
    if cp.returncode == 0:
        return True
    if not ipcmd.link_exists(tap, netns):
        return False
    raise NetCommandError(ipcmd.ip_argv(netns, "link", "del", "dev", tap), cp.returncode, cp.stderr)


delete_vm_link = delete_vm_tap


def ensure_metadata_address(netns: str | None = None) -> None:
    """METADATA_IP/32 on lo (and lo up), idempotent. ``scope host``: reachable
    by guests through their gateway, but never chosen as a source address for
    the host's own traffic."""
    ipcmd.ip("link", "set", "lo", "up", netns=netns)
    ipcmd.ip("addr", "replace", f"{METADATA_IP}/32", "dev", "lo", "scope", "host", netns=netns)


# --------------------------------------------------------------------------- guest side


def guest_network_commands(vm_ip: str, ifname: str = "eth0") -> list[str]:
    """Shell commands that configure a guest's network (for images / cloud-init)."""
    vm = validate_vm_ip(vm_ip)
    validate_ifname(ifname)
    return [
        f"ip addr add {vm}/32 dev {ifname}",
        f"ip link set {ifname} up",
        f"ip route add {GATEWAY_IP} dev {ifname} scope link",
        f"ip route add default via {GATEWAY_IP} dev {ifname}",
    ]


def configure_guest_link(ifname: str, vm_ip: str, netns: str | None = None,
                         *, mac: str | None = None) -> None:
    """Configure a stand-in guest (e.g. a veth end in its own namespace) exactly
    as a real guest would be: VM_IP/32, on-link route to the gateway, default via it."""
    vm = validate_vm_ip(vm_ip)
    validate_ifname(ifname)
    ipcmd.ip("link", "set", "lo", "up", netns=netns)
    if mac is not None:
        ipcmd.ip("link", "set", "dev", ifname, "address", validate_mac(mac), netns=netns)
    ipcmd.ip("addr", "replace", f"{vm}/32", "dev", ifname, netns=netns)
    ipcmd.ip("link", "set", "dev", ifname, "up", netns=netns)
    ipcmd.ip("route", "replace", GATEWAY_IP, "dev", ifname, "scope", "link", netns=netns)
    ipcmd.ip("route", "replace", "default", "via", GATEWAY_IP, "dev", ifname, netns=netns)

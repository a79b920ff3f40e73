"""Gratuitous ARP for the gateway on a VM's tap, so the guest's neighbour cache is right at once."""
from __future__ import annotations

import socket
import struct

from ferry.net.addressing import GATEWAY_IP, GATEWAY_MAC

ETH_P_ARP = 0x0806


def garp_frame(ip: str = GATEWAY_IP, mac: str = GATEWAY_MAC) -> bytes:
    """An unsolicited ARP reply (sender = target = ip) to the broadcast address. Pure."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = socket.inet_aton(ip)
    eth = b"\xff" * 6 + hw + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + hw + addr + b"\xff" * 6 + addr
    return eth + arp


def send_garp(ifname: str, count: int = 3) -> None:
    """Send on `ifname` in the current namespace (needs CAP_NET_RAW)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((ifname, 0))
        for _ in range(count):
            s.send(garp_frame())

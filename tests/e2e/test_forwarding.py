"""End-to-end test of post-migration forwarding (ferry.net.forwarding) and of
the fabric's propagation delay (LabFabric(propagation_delay_s=...)).

Needs root. Labs use a random prefix ``ft<4 hex>``; the "VM" is a stand-in
guest (a namespace joined by a veth configured like a tap, with an echo
service on port 7 and an HTTP status page), "migrated" by moving its link to
another host. Traffic only goes to addresses inside namespaces created here.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from ferry.lab.traffic import collect, count_between, run_probe_in_client, wait_ready
from ferry.net import ipcmd
from ferry.net.addressing import tap_name
from ferry.net.fabric import LabFabric
from ferry.net.forwarding import (
    accept_forwarding,
    forward_ifname,
    forward_mac,
    forwarding_counters,
    list_forwardings,
    start_forwarding,
    stop_accepting,
    stop_forwarding,
)
from ferry.net.lab import LabNetwork, netns_exec_argv
from ferry.net.vmnet import create_vm_tap, delete_vm_tap
from tests.e2e.test_traffic_probe import (  # noqa: F401 - fixtures
    Procs,
    netlab,
    procs,
    pytestmark,
    start_guest,
)

FABRIC_DELAY_S = 2.0


def route_dev(ns: str, vm_ip: str) -> str | None:
    routes = ipcmd.ip_json("route", "show", "exact", f"{vm_ip}/32", netns=ns)
    return routes[0].get("dev") if routes else None


def sysctl(ns: str, key: str) -> str:
    return ipcmd.run(netns_exec_argv(ns, [ipcmd.resolve_tool("sysctl"), "-n", key])).stdout.strip()


def test_forwarding_devices_routes_and_teardown(netlab: LabNetwork) -> None:
    """What start/accept/stop do to a host, with a tap that still exists (VM
    paused on the source), idempotency and the leftovers listing."""
    hosts = netlab.create(["h1", "h2"])
    h1, h2 = hosts["h1"], hosts["h2"]
    vm = "10.200.0.10"
    tap = tap_name("vm-paused")
    dev = forward_ifname(vm)
    create_vm_tap(tap, vm, netns=h1.netns)  # the paused source VM still has its tap and route
    create_vm_tap(tap, vm, netns=h2.netns)  # the target's tap
    assert route_dev(h1.netns, vm) == tap

    acc = accept_forwarding(vm, h2.underlay_ip, h1.underlay_ip, netns=h2.netns)
    assert accept_forwarding(vm, h2.underlay_ip, h1.underlay_ip, netns=h2.netns) == acc  # idempotent
    fwd = start_forwarding(vm, h1.underlay_ip, h2.underlay_ip, netns=h1.netns)
    assert start_forwarding(vm, h1.underlay_ip, h2.underlay_ip, netns=h1.netns) == fwd
    assert (fwd.role, acc.role, fwd.ifname, fwd.mtu) == ("forward", "accept", dev, 1450)

    # source: the tunnel route replaced the tap route; static neighbour, no ARP
    assert route_dev(h1.netns, vm) == dev
    (neigh,) = ipcmd.ip_json("neigh", "show", vm, "dev", dev, netns=h1.netns)
    assert neigh["lladdr"] == forward_mac(h2.underlay_ip) and "PERMANENT" in neigh["state"]
    (link,) = ipcmd.ip_json("-d", "link", "show", "dev", dev, netns=h1.netns)
    info = link["linkinfo"]["info_data"]
    assert (info["id"], info["local"], info["remote"], info["port"], info["learning"]) == (
        0xC8000A, h1.underlay_ip, h2.underlay_ip, 4789, False)
    assert link["address"] == forward_mac(h1.underlay_ip) and "UP" in link["flags"]
    assert sysctl(h1.netns, f"net.ipv4.conf.{dev}.rp_filter") == "2"
    # target: its tap route is untouched, the device has the target's MAC
    assert route_dev(h2.netns, vm) == tap
    (link2,) = ipcmd.ip_json("-d", "link", "show", "dev", dev, netns=h2.netns)
    assert link2["address"] == forward_mac(h2.underlay_ip)
    assert [h.role for h in list_forwardings(h1.netns)] == ["forward"]
    assert list_forwardings(h2.netns) == [acc]

    # deleting the paused source VM's tap does not touch the tunnel route
    assert delete_vm_tap(tap, netns=h1.netns)
    assert route_dev(h1.netns, vm) == dev

    # a target that forwards the VM onwards keeps the device on stop_accepting
    assert stop_accepting(vm, netns=h1.netns) is False and route_dev(h1.netns, vm) == dev

    assert stop_forwarding(fwd) is True
    assert stop_forwarding(vm, netns=h1.netns) is False
    assert route_dev(h1.netns, vm) is None and not ipcmd.link_exists(dev, h1.netns)
    assert stop_accepting(acc) is True
    assert stop_accepting(vm, netns=h2.netns) is False
    assert route_dev(h2.netns, vm) == tap and list_forwardings(h2.netns) == []

    # a device of the VM with other endpoints (an older migration) is recreated
    accept_forwarding(vm, h1.underlay_ip, "10.201.9.2", netns=h1.netns)
    again = start_forwarding(vm, h1.underlay_ip, h2.underlay_ip, netns=h1.netns)
    assert list_forwardings(h1.netns) == [again]
    assert stop_forwarding(again)


def test_fabric_propagation_delay(netlab: LabNetwork) -> None:
    hosts = netlab.create(["h1", "h2"])
    u1, u2 = hosts["h1"].underlay_ip, hosts["h2"].underlay_ip
    vm = "10.200.0.20"
    fab = LabFabric(netlab.layout.fabric_ns(), propagation_delay_s=0.5)
    fab.announce(vm, u1)  # immediate, as before
    assert fab.lookup(vm) == u1

    t0 = time.monotonic()
    pending = fab.announce_after(vm, u2)
    assert fab.lookup(vm) == u1  # not yet
    assert pending.wait(5) is True
    assert pending.announced_at is not None and pending.announced_at - t0 >= 0.5
    assert fab.lookup(vm) == u2

    cancelled = fab.announce_after(vm, u1, delay_s=5)
    assert cancelled.cancel() is True and cancelled.wait(0) is False
    assert fab.lookup(vm) == u2

    async def delayed() -> float:
        t = time.monotonic()
        await fab.announce_delayed(vm, u1)
        return time.monotonic() - t

    assert asyncio.run(delayed()) >= 0.5
    assert fab.lookup(vm) == u1


def _migrate_under_load(netlab: LabNetwork, procs: Procs, *, forwarding: bool, src, dst, guest,  # noqa: ANN001
                        duration_s: float = 6.0) -> dict:
    """Probe the guest from the client while it "migrates" from *src* to *dst*
    and the fabric follows FABRIC_DELAY_S later. Returns the probe's report
    plus the test's own timestamps (time.monotonic(), like the probe's)."""
    fab = LabFabric(netlab.layout.fabric_ns(), propagation_delay_s=FABRIC_DELAY_S)
    assert fab.lookup(guest.ip) == src.underlay_ip
    probe = procs.add(run_probe_in_client(netlab.layout.prefix, guest.ip, duration_s, timeline=True))
    assert wait_ready(probe), probe.probe_stderr  # type: ignore[attr-defined]
    time.sleep(1.0)  # steady state first

    if forwarding:
        accept_forwarding(guest.ip, dst.underlay_ip, src.underlay_ip, netns=dst.netns)  # target-ready
    t_move = time.monotonic()
    guest.move(src, dst)  # blackout: the VM stops on src and resumes on dst
    if forwarding:
        start_forwarding(guest.ip, src.underlay_ip, dst.underlay_ip, netns=src.netns)
    t_resumed = time.monotonic()
    pending = fab.announce_after(guest.ip, dst.underlay_ip)  # the fabric catches up 2 s later
    time.sleep(FABRIC_DELAY_S / 2)
    assert fab.lookup(guest.ip) == src.underlay_ip  # mid-brownout: the fabric still routes to src
    assert pending.wait(FABRIC_DELAY_S + 5)
    t_fabric = pending.announced_at
    assert fab.lookup(guest.ip) == dst.underlay_ip
    counters = None
    if forwarding:
        time.sleep(0.2)  # packets already in the tunnel
        counters = (forwarding_counters(guest.ip, src.netns), forwarding_counters(guest.ip, dst.netns))
        assert stop_forwarding(guest.ip, netns=src.netns)
        assert stop_accepting(guest.ip, netns=dst.netns)
    r = collect(probe)
    r["test"] = {"t_move": t_move, "t_resumed": t_resumed, "t_fabric": t_fabric, "counters": counters,
                 "blackout_ms": round((t_resumed - t_move) * 1000, 1)}
    return r


def test_brownout_forwarding_keeps_connections(netlab: LabNetwork, procs: Procs) -> None:
    """Guest moves h1 -> h2 with source forwarding (fabric 2 s late), then back
    h2 -> h1 without forwarding: compare what the client sees."""
    hosts = netlab.create(["h1", "h2"])
    h1, h2 = hosts["h1"], hosts["h2"]
    guest = start_guest(netlab, h1, procs)
    LabFabric(netlab.layout.fabric_ns()).announce(guest.ip, h1.underlay_ip)

    with_fwd = _migrate_under_load(netlab, procs, forwarding=True, src=h1, dst=h2, guest=guest)
    without = _migrate_under_load(netlab, procs, forwarding=False, src=h2, dst=h1, guest=guest)

    for name, r in (("with forwarding (h1 -> h2)", with_fwd), ("without forwarding (h2 -> h1)", without)):
        e, h, t = r["echo"], r["http"], r["test"]
        print(f"\n{name}: blackout {t['blackout_ms']} ms, fabric delay {FABRIC_DELAY_S:g} s | "
              f"echo: survived={e['survived']} "
              f"{e['received']}/{e['sent']} longest gap {e['longest_gap_ms']} ms rtt p50/p99 "
              f"{e['rtt_ms']['p50']}/{e['rtt_ms']['p99']} ms | http: ok {h['ok']} failed {h['failed']} "
              f"{h['errors']} longest gap {h['longest_gap_ms']} ms latency p50/p99 "
              f"{h['latency_ms']['p50']}/{h['latency_ms']['p99']} ms")
    print(f"tunnel counters (h1 tx, h2 rx): {with_fwd['test']['counters']}")

    # ---- with forwarding: the brownout is invisible beyond the blackout itself
    e, h, t = with_fwd["echo"], with_fwd["http"], with_fwd["test"]
    assert e["survived"], e["failure"]
    assert e["longest_gap_ms"] < 1000, "gap not well under the fabric delay"
    assert h["longest_gap_ms"] < 1000
    # during the brownout (fabric still routing to h1) traffic kept reaching the guest on h2
    window = (t["t_resumed"] + 0.5, t["t_fabric"] - 0.05)
    span = window[1] - window[0]
    assert span > 1.0
    assert count_between(with_fwd["timeline"]["echo_replies"], *window) >= 0.6 * span / 0.010
    assert count_between(with_fwd["timeline"]["http_ok"], *window) >= 0.6 * span / 0.050
    # ... through the tunnel: h1 sent and h2 received decapsulated packets
    src_c, dst_c = t["counters"]
    assert src_c["tx_packets"] >= span / 0.010 and dst_c["rx_packets"] >= src_c["tx_packets"] * 0.95
    # HTTP failures, if any, are requests whose SYN hit the blackout
    for started in with_fwd["timeline"]["http_failed_started"]:
        assert t["t_move"] - 2.5 <= started <= t["t_resumed"] + 0.5
    assert h["failed"] <= 5

    # ---- without forwarding: everything stalls for about the fabric delay
    e0, h0 = without["echo"], without["http"]
    assert e0["longest_gap_ms"] >= 0.8 * FABRIC_DELAY_S * 1000
    assert h0["longest_gap_ms"] >= 0.8 * FABRIC_DELAY_S * 1000
    assert h0["failed"] > 0
    assert count_between(without["timeline"]["echo_replies"],
                         without["test"]["t_resumed"] + 0.2, without["test"]["t_fabric"] - 0.05) == 0
    assert e0["longest_gap_ms"] > 3 * e["longest_gap_ms"]

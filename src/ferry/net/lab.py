"""A whole fleet's network on one machine: Linux network namespaces.

::

                       {prefix}-fabric  (router: ip_forward=1, rp_filter=0,
                      /      |      \\    one /32 route per VM -> its host)
          fab-client /  fab-h1|  fab-h2\\ ...
        10.201.0.1/30  10.201.1.1/30  10.201.2.1/30
              |              |              |
        uplink0         uplink0         uplink0
      10.201.0.2/30   10.201.1.2/30   10.201.2.2/30
   {prefix}-client   {prefix}-h1      {prefix}-h2      (default via .1)
                     VM taps ...      VM taps ...

The veths are created directly inside their namespaces (``ip -n FABRIC link
add ... peer name uplink0 netns MEMBER``), so nothing ever appears in, or can
collide with, the root namespace.
"""

from __future__ import annotations

from collections.abc import Sequence

from ferry.net import ipcmd
from ferry.net.addressing import LabLayout, LabMember
from ferry.net.errors import NamespaceExistsError
from ferry.net.fabric import LabFabric
from ferry.net.ipcmd import netns_exec_argv  # re-exported: part of this module's API

__all__ = ["LabNetwork", "netns_exec_argv", "router_sysctls", "member_sysctls"]


def router_sysctls(ifnames: Sequence[str] = ()) -> dict[str, str]:
    """Sysctls of a namespace that routes (fabric, lab hosts).

    ip_forward=1: forward between fabric veths / uplink and VM taps.
    rp_filter=0 (all, default, and each existing link; the kernel uses
    max(all, link)): during and after a migration packets of one VM address can
    legitimately arrive from the "wrong" side (old host still sending, source
    forwarding), strict reverse-path filtering would drop them.
    send_redirects=0: a packet routed back out of the link it came in on (stale
    route during a move) must not make the router emit ICMP redirects."""
    s: dict[str, str] = {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
        "net.ipv4.conf.all.send_redirects": "0",
        "net.ipv4.conf.default.send_redirects": "0",
    }
    for ifname in ifnames:
        s[f"net.ipv4.conf.{ifname}.rp_filter"] = "0"
        s[f"net.ipv4.conf.{ifname}.send_redirects"] = "0"
    return s


def member_sysctls(member: LabMember) -> dict[str, str]:
    return router_sysctls([member.uplink_veth])


class LabNetwork:
    """Create / inspect / destroy the namespaces of one lab (all named ``{prefix}-*``)."""

    def __init__(self, layout: LabLayout | str | None = None) -> None:
        if layout is None:
            layout = LabLayout()
        elif isinstance(layout, str):
            layout = LabLayout(layout)
        self.layout = layout

    # ------------------------------------------------------------------ inspection

    def existing_namespaces(self) -> list[str]:
        """Sorted names of existing namespaces that belong to this lab (``{prefix}-*``)."""
        return sorted(ns for ns in ipcmd.list_netns() if self.layout.owns_namespace(ns))

    def exists(self) -> bool:
        return self.layout.fabric_ns() in ipcmd.list_netns()

    def fabric(self) -> LabFabric:
        return LabFabric(self.layout.fabric_ns())

    def hosts(self) -> dict[str, LabMember]:
        """Hosts of the running lab, discovered from the namespaces (name -> member).

        A host namespace is recognised by the underlay address on its uplink."""
        found: dict[str, LabMember] = {}
        skip = {self.layout.fabric_ns(), self.layout.client_ns()}
        for ns in self.existing_namespaces():
            if ns in skip:
                continue
            index = self._uplink_index(ns)
            if index is None or index == 0:
                continue
            name = ns[len(self.layout.ns_prefix()):]
            found[name] = self.layout.host(name, index)
        return found

    def _uplink_index(self, ns: str) -> int | None:
        uplink = self.layout.uplink_veth()
        if not ipcmd.link_exists(uplink, netns=ns):
            return None
        for entry in ipcmd.ip_json("addr", "show", "dev", uplink, netns=ns):
            for a in entry.get("addr_info", []):
                if a.get("family") == "inet":
                    index = self.layout.index_of_underlay_ip(a.get("local", ""))
                    if index is not None:
                        return index
        return None

    def pids(self) -> dict[str, list[int]]:
        """Processes still living in this lab's namespaces (they keep a deleted
        namespace, and its interfaces and routes, alive)."""
        return {ns: ipcmd.netns_pids(ns) for ns in self.existing_namespaces()}

    # ------------------------------------------------------------------ create / destroy

    def create(self, hosts: Sequence[str]) -> dict[str, LabMember]:
        """Create fabric, client and one namespace per host (numbered 1.. in order).

        Raises NamespaceExistsError, creating nothing, if any of these namespaces
        already exists; on any other failure removes what it created and re-raises."""
        planned = self.layout.plan_hosts(hosts)
        client = self.layout.client()
        fabric_ns = self.layout.fabric_ns()
        wanted = [fabric_ns, client.netns, *(h.netns for h in planned)]
        existing = set(ipcmd.list_netns())
        clash = [ns for ns in wanted if ns in existing]
        if clash:
            raise NamespaceExistsError(clash)

        created: list[str] = []
        try:
            ipcmd.add_netns(fabric_ns)
            created.append(fabric_ns)
            ipcmd.ip("link", "set", "lo", "up", netns=fabric_ns)
            ipcmd.set_sysctls(router_sysctls(), fabric_ns)
            for member in [client, *planned]:
                ipcmd.add_netns(member.netns)
                created.append(member.netns)
                self._join(member)
            ipcmd.set_sysctls(router_sysctls([m.fabric_veth for m in [client, *planned]]), fabric_ns)
        except BaseException:
            for ns in reversed(created):
                try:
                    ipcmd.delete_netns(ns)
                except Exception:  # pragma: no cover - best effort rollback
                    pass
            raise
        return {h.name: h for h in planned}

    def add_host(self, host_name: str, index: int) -> LabMember:
        """Add one host to a running lab (its index must be unused)."""
        member = self.layout.host(host_name, index)
        fabric_ns = self.layout.fabric_ns()
        existing = set(ipcmd.list_netns())
        if member.netns in existing:
            raise NamespaceExistsError([member.netns])
        if ipcmd.link_exists(member.fabric_veth, netns=fabric_ns):
            raise NamespaceExistsError([f"{fabric_ns}:{member.fabric_veth} (host index {index} in use)"])
        ipcmd.add_netns(member.netns)
        try:
            self._join(member)
            ipcmd.set_sysctls(router_sysctls([member.fabric_veth]), fabric_ns)
        except BaseException:
            ipcmd.delete_netns(member.netns)
            raise
        return member

    def _join(self, m: LabMember) -> None:
        """Join an (empty, existing) member namespace to the fabric by a veth pair."""
        fab = self.layout.fabric_ns()
        ipcmd.ip("link", "set", "lo", "up", netns=m.netns)
        ipcmd.ip("link", "add", m.fabric_veth, "type", "veth",
                 "peer", "name", m.uplink_veth, "netns", m.netns, netns=fab)
        ipcmd.ip("addr", "add", m.fabric_cidr, "dev", m.fabric_veth, netns=fab)
        ipcmd.ip("link", "set", m.fabric_veth, "up", netns=fab)
        ipcmd.ip("addr", "add", m.underlay_cidr, "dev", m.uplink_veth, netns=m.netns)
        ipcmd.ip("link", "set", m.uplink_veth, "up", netns=m.netns)
        ipcmd.ip("route", "replace", "default", "via", m.fabric_ip, "dev", m.uplink_veth, netns=m.netns)
        ipcmd.set_sysctls(member_sysctls(m), m.netns)

    def destroy(self) -> list[str]:
        """Delete every namespace named ``{prefix}-*`` (their veths go with them).

        Idempotent. Returns the namespaces deleted by this call. Processes still
        running inside keep their (now unnamed) namespace alive: stop them first
        (see :meth:`pids`)."""
        deleted: list[str] = []
        for ns in self.existing_namespaces():
            if ipcmd.delete_netns(ns):
                deleted.append(ns)
        return deleted

"""The routed fabric: each VM address is a /32 route to the host running it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ferry.net import ipcmd
from ferry.net.addressing import validate_ipv4, validate_vm_ip
from ferry.net.errors import InvalidNetValue, NetCommandError

ROUTE_PROTO = "static"  # protocol tag of fabric routes (listed by LabFabric.routes)


@runtime_checkable
class Fabric(Protocol):
    def announce(self, vm_ip: str, host_underlay_ip: str) -> None:
        """Route *vm_ip*/32 to the host whose underlay address is given (replaces any route)."""
        ...

    def withdraw(self, vm_ip: str, host_underlay_ip: str) -> bool:
        """Remove the route of *vm_ip* only if it still points to *host_underlay_ip*.

        Returns True if a route was removed. A late withdraw by a migration
        source must never remove the target's fresh route."""
        ...

    def lookup(self, vm_ip: str) -> str | None:
        """Underlay address the route of *vm_ip* points to, or None."""
        ...


class LabFabric(Fabric):
    """Fabric of a lab: /32 routes in the fabric namespace's main table."""

    def __init__(self, fabric_ns: str) -> None:
        if not fabric_ns:
            raise InvalidNetValue("LabFabric needs a fabric namespace name")
        self.fabric_ns = fabric_ns

    @property
    def spec(self) -> str:
        return f"lab:{self.fabric_ns}"

    def __repr__(self) -> str:
        return f"LabFabric({self.fabric_ns!r})"

    def announce(self, vm_ip: str, host_underlay_ip: str) -> None:
        vm = validate_vm_ip(vm_ip)
        via = validate_ipv4(host_underlay_ip, "host underlay address")
        ipcmd.ip("route", "replace", f"{vm}/32", "via", via, "proto", ROUTE_PROTO, netns=self.fabric_ns)

    def withdraw(self, vm_ip: str, host_underlay_ip: str) -> bool:
        # Atomic in the kernel: a delete that names the gateway only matches a
        # route whose nexthop is that gateway (else ESRCH "No such process").
        # No lookup-then-delete race with a concurrent announce.
        vm = validate_vm_ip(vm_ip)
        via = validate_ipv4(host_underlay_ip, "host underlay address")
        argv = ("route", "del", f"{vm}/32", "via", via)
        cp = ipcmd.ip(*argv, netns=self.fabric_ns, check=False)
        if cp.returncode == 0:
            return True
        if "No such process" in cp.stderr:
            return False
        raise NetCommandError(ipcmd.ip_argv(self.fabric_ns, *argv), cp.returncode, cp.stderr)

    def lookup(self, vm_ip: str) -> str | None:
        vm = validate_vm_ip(vm_ip)
        for r in ipcmd.ip_json("route", "show", "exact", f"{vm}/32", netns=self.fabric_ns):
            gw = r.get("gateway")
            if gw:
                return str(gw)
        return None

    def routes(self) -> dict[str, str]:
        """All announced VM routes: vm_ip -> host underlay address."""
        out: dict[str, str] = {}
        for r in ipcmd.ip_json("route", "show", "proto", ROUTE_PROTO, netns=self.fabric_ns):
            dst, gw = r.get("dst", ""), r.get("gateway")
            if gw and "/" not in dst:  # /32 routes are printed without a prefix length
                out[dst] = str(gw)
        return out


class NullFabric(Fabric):
    """Fabric whose routing is done elsewhere (real hosts): every call is a no-op."""

    spec = "none"

    def __repr__(self) -> str:
        return "NullFabric()"

    def announce(self, vm_ip: str, host_underlay_ip: str) -> None:
        return None

    def withdraw(self, vm_ip: str, host_underlay_ip: str) -> bool:
        return False

    def lookup(self, vm_ip: str) -> str | None:
        return None


def fabric_from_spec(spec: str) -> Fabric:
    """``"lab:<fabric_ns>"`` -> LabFabric, ``"none"`` -> NullFabric."""
    s = (spec or "").strip()
    if s == "none":
        return NullFabric()
    if s.startswith("lab:") and len(s) > len("lab:"):
        return LabFabric(s[len("lab:"):])
    raise InvalidNetValue(f"invalid fabric spec {spec!r} (expected 'lab:<fabric namespace>' or 'none')")

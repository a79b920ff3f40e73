"""The routed fabric: each VM address is a /32 route to the host running it.

Propagation delay
-----------------
A real fabric (BGP, an SDN controller, ...) takes a while to route a VM's
address to its new host after a migration. ``LabFabric(ns,
propagation_delay_s=D)`` models that: :meth:`Fabric.announce` still changes
the route at once (it is what the fabric does when the update arrives), while
:meth:`Fabric.announce_delayed` (asyncio, for the agent) and
:meth:`LabFabric.announce_after` (a thread, for synchronous callers) wait D
seconds first. Until then the fabric keeps sending the VM's packets to the old
host, which is what :mod:`ferry.net.forwarding` bridges.

Spec strings (agent setting ``--fabric``): ``lab:<fabric ns>`` (no delay) or
``lab:<fabric ns>?delay=<seconds>``, e.g. ``lab:ferry-fabric?delay=2``;
``none`` for hosts whose routing is done elsewhere.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Protocol, runtime_checkable

from ferry.net import ipcmd
from ferry.net.addressing import validate_ipv4, validate_vm_ip
from ferry.net.errors import InvalidNetValue, NetCommandError

ROUTE_PROTO = "static"  # protocol tag of fabric routes (listed by LabFabric.routes)
MAX_PROPAGATION_DELAY_S = 300.0


def validate_delay(delay_s: float, what: str = "propagation delay") -> float:
    """A delay in seconds: a finite number in 0..MAX_PROPAGATION_DELAY_S."""
    try:
        d = float(delay_s)
    except (TypeError, ValueError):
        raise InvalidNetValue(f"invalid {what} {delay_s!r} (seconds expected)") from None
    if isinstance(delay_s, bool) or not math.isfinite(d) or not 0.0 <= d <= MAX_PROPAGATION_DELAY_S:
        raise InvalidNetValue(f"invalid {what} {delay_s!r} (0..{MAX_PROPAGATION_DELAY_S:g} s)")
    return d


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

    # Seconds between an announcement and the moment the fabric routes by it
    # (0 = at once). Used by announce_delayed / announce_after, never by announce.
    propagation_delay_s: float = 0.0

    async def announce_delayed(self, vm_ip: str, host_underlay_ip: str, delay_s: float | None = None) -> None:
        """Announce after the propagation delay (*delay_s*, default
        ``propagation_delay_s``), without blocking the event loop.

        The arguments are validated at once, before the wait; cancelling the
        task during the wait announces nothing."""
        delay = self.propagation_delay_s if delay_s is None else validate_delay(delay_s)
        _validate_announcement(vm_ip, host_underlay_ip)
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.to_thread(self.announce, vm_ip, host_underlay_ip)

    def announce_after(self, vm_ip: str, host_underlay_ip: str,
                       delay_s: float | None = None) -> DelayedAnnouncement:
        """Announce from a background thread after the propagation delay (for
        synchronous callers). Returns the started thread: ``cancel()`` before it
        fires, ``wait()`` for it (re-raises the announcement's error)."""
        delay = self.propagation_delay_s if delay_s is None else validate_delay(delay_s)
        _validate_announcement(vm_ip, host_underlay_ip)
        pending = DelayedAnnouncement(self, vm_ip, host_underlay_ip, delay)
        pending.start()
        return pending


def _validate_announcement(vm_ip: str, host_underlay_ip: str) -> None:
    validate_vm_ip(vm_ip)
    validate_ipv4(host_underlay_ip, "host underlay address")


class DelayedAnnouncement(threading.Thread):
    """A fabric announcement that fires after *delay_s* seconds (daemon thread)."""

    def __init__(self, fabric: Fabric, vm_ip: str, host_underlay_ip: str, delay_s: float) -> None:
        super().__init__(name=f"announce-{vm_ip}", daemon=True)
        self.fabric, self.vm_ip, self.host_underlay_ip = fabric, vm_ip, host_underlay_ip
        self.delay_s = delay_s
        self.announced_at: float | None = None  # time.monotonic() of the route change
        self.error: BaseException | None = None
        self._cancelled = threading.Event()

    def run(self) -> None:
        if self._cancelled.wait(self.delay_s):
            return
        try:
            self.fabric.announce(self.vm_ip, self.host_underlay_ip)
            self.announced_at = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            self.error = exc

    def cancel(self) -> bool:
        """Stop it from firing; False if it already announced (or failed)."""
        self._cancelled.set()
        self.join()
        return self.announced_at is None and self.error is None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set() and self.announced_at is None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until it fired; True if the route was announced (False: cancelled
        or still pending after *timeout*). Re-raises the announcement's error."""
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return self.announced_at is not None


class LabFabric(Fabric):
    """Fabric of a lab: /32 routes in the fabric namespace's main table.

    *propagation_delay_s* models a fabric that takes that long to route by an
    announcement; it applies to :meth:`announce_delayed` and
    :meth:`announce_after` only (``announce`` is immediate)."""

    def __init__(self, fabric_ns: str, propagation_delay_s: float = 0.0) -> None:
        if not fabric_ns:
            raise InvalidNetValue("LabFabric needs a fabric namespace name")
        self.fabric_ns = fabric_ns
        self.propagation_delay_s = validate_delay(propagation_delay_s)

    @property
    def spec(self) -> str:
        if self.propagation_delay_s:
            return f"lab:{self.fabric_ns}?delay={self.propagation_delay_s:g}"
        return f"lab:{self.fabric_ns}"

    def __repr__(self) -> str:
        if self.propagation_delay_s:
            return f"LabFabric({self.fabric_ns!r}, propagation_delay_s={self.propagation_delay_s:g})"
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
    """``"lab:<fabric_ns>[?delay=<seconds>]"`` -> LabFabric, ``"none"`` -> NullFabric."""
    s = (spec or "").strip()
    if s == "none":
        return NullFabric()
    if s.startswith("lab:"):
        ns, _, query = s[len("lab:"):].partition("?")
        if ns:
            delay = 0.0
            for item in query.split("&") if query else []:
                key, eq, value = item.partition("=")
                if key != "delay" or not eq:
                    raise InvalidNetValue(f"invalid fabric spec {spec!r} (unknown option {item!r}; "
                                          "expected 'lab:<fabric namespace>?delay=<seconds>')")
                try:
                    delay = validate_delay(value, "delay")
                except InvalidNetValue as exc:
                    raise InvalidNetValue(f"invalid fabric spec {spec!r}: {exc}") from None
            return LabFabric(ns, propagation_delay_s=delay)
    raise InvalidNetValue(f"invalid fabric spec {spec!r} (expected 'lab:<fabric namespace>[?delay=<seconds>]' "
                          "or 'none')")

"""One QMP session per VM (library `qemu.qmp`), with a record of its events.

Events carry QEMU's own wall-clock timestamp; blackout is measured from the
source's STOP event to the target's RESUME event, so those timestamps are kept.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from qemu.qmp import QMPClient

log = logging.getLogger(__name__)

RECORDED_EVENTS = frozenset({
    "STOP", "RESUME", "SHUTDOWN", "POWERDOWN", "RESET", "MIGRATION", "MIGRATION_PASS",
    "SUSPEND", "GUEST_PANICKED",
})


@dataclass(frozen=True)
class VmEvent:
    name: str
    at: float          # QEMU's wall-clock timestamp, seconds since the epoch
    data: dict

    def to_dict(self) -> dict:
        return {"event": self.name, "at": self.at, "data": self.data}


def event_from_qmp(msg: dict) -> VmEvent:
    ts = msg.get("timestamp") or {}
    at = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
    return VmEvent(msg["event"], at, dict(msg.get("data") or {}))


class QmpSession:
    """A connected QMP client plus a bounded log of the VM's events."""

    def __init__(self, vm_name: str, socket_path: str, max_events: int = 2000):
        self.vm_name = vm_name
        self.socket_path = socket_path
        self.events: list[VmEvent] = []
        self._max_events = max_events
        self._client = QMPClient(vm_name)
        self._reader: asyncio.Task | None = None
        self._changed = asyncio.Condition()

    async def connect(self, timeout_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                await self._client.connect(self.socket_path)
                break
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self._reader = asyncio.create_task(self._read_events(), name=f"qmp-events-{self.vm_name}")

    async def _read_events(self) -> None:
        with self._client.listener() as listener:
            async for msg in listener:
                if msg["event"] not in RECORDED_EVENTS:
                    continue
                event = event_from_qmp(msg)
                self.events.append(event)
                del self.events[: -self._max_events]
                async with self._changed:
                    self._changed.notify_all()

    async def execute(self, command: str, arguments: dict | None = None, timeout_s: float = 30.0):
        return await asyncio.wait_for(self._client.execute(command, arguments), timeout_s)

    async def wait_for_event(self, name: str, after: float = 0.0, timeout_s: float = 30.0) -> VmEvent:
        """The first recorded `name` event at or after `after` (QEMU time), waiting for it if needed."""

        def found() -> VmEvent | None:
            return next((e for e in self.events if e.name == name and e.at >= after), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(found), timeout_s)
        return found()  # type: ignore[return-value]

    async def wait_for(self, predicate, timeout_s: float = 30.0) -> VmEvent:
        """The first recorded event satisfying `predicate`, waiting for it if needed."""

        def found() -> VmEvent | None:
            return next((e for e in self.events if predicate(e)), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(found), timeout_s)
        return found()  # type: ignore[return-value]

    def last_event(self, name: str) -> VmEvent | None:
        return next((e for e in reversed(self.events) if e.name == name), None)

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        try:
            await self._client.disconnect()
        except Exception:  # the VM may already be gone
            pass

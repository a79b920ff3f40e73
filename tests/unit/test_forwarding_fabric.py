"""The fabric's propagation delay (LabFabric(propagation_delay_s=...)), without root:
spec strings, and the delayed announcements against a recording fabric."""

from __future__ import annotations

import asyncio
import time

import pytest

from ferry.net.errors import InvalidNetValue
from ferry.net.fabric import Fabric, LabFabric, NullFabric, fabric_from_spec, validate_delay

VM, U1 = "10.200.0.10", "10.201.1.2"


class RecordingFabric(LabFabric):
    """A LabFabric whose announce only records (no `ip`)."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__("unused-ns", propagation_delay_s=delay)
        self.calls: list[tuple[str, str, float]] = []

    def announce(self, vm_ip: str, host_underlay_ip: str) -> None:
        self.calls.append((vm_ip, host_underlay_ip, time.monotonic()))


def test_spec_with_delay_round_trips() -> None:
    f = fabric_from_spec("lab:ferry-fabric?delay=2.5")
    assert isinstance(f, LabFabric) and f.fabric_ns == "ferry-fabric" and f.propagation_delay_s == 2.5
    assert f.spec == "lab:ferry-fabric?delay=2.5" and fabric_from_spec(f.spec).propagation_delay_s == 2.5
    assert "2.5" in repr(f)
    plain = fabric_from_spec("lab:ferry-fabric")
    assert plain.propagation_delay_s == 0.0 and plain.spec == "lab:ferry-fabric"
    assert fabric_from_spec("lab:x?delay=0").spec == "lab:x"
    assert LabFabric("x", 2).spec == "lab:x?delay=2"
    assert NullFabric().propagation_delay_s == 0.0
    assert isinstance(f, Fabric) and isinstance(NullFabric(), Fabric)
    for bad in ("lab:x?delay=", "lab:x?delay=-1", "lab:x?delay=nan", "lab:x?delay=inf", "lab:x?delay=abc",
                "lab:x?delay=301", "lab:x?speed=2", "lab:x?delay=1&x=2", "lab:?delay=1"):
        with pytest.raises(InvalidNetValue, match="invalid fabric spec"):
            fabric_from_spec(bad)


def test_validate_delay() -> None:
    assert validate_delay(0) == 0.0 and validate_delay("1.5") == 1.5
    for bad in (-0.1, float("nan"), float("inf"), 1e9, True, None, "x"):
        with pytest.raises(InvalidNetValue):
            validate_delay(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidNetValue):
        LabFabric("x", propagation_delay_s=-1)


def test_announce_stays_immediate_and_announce_after_waits() -> None:
    f = RecordingFabric(delay=0.2)
    f.announce(VM, U1)
    assert len(f.calls) == 1  # immediate
    t0 = time.monotonic()
    pending = f.announce_after(VM, U1)
    assert len(f.calls) == 1
    assert pending.wait(5) is True
    assert len(f.calls) == 2 and f.calls[1][2] - t0 >= 0.2 and pending.announced_at >= f.calls[1][2]
    assert pending.cancel() is False  # already fired

    quick = f.announce_after(VM, U1, delay_s=0)
    assert quick.wait(5) and len(f.calls) == 3

    later = f.announce_after(VM, U1, delay_s=10)
    assert later.cancel() is True and later.cancelled and later.wait(0) is False
    assert len(f.calls) == 3
    with pytest.raises(InvalidNetValue):
        f.announce_after("10.201.1.2", U1)  # validated before the wait
    with pytest.raises(InvalidNetValue):
        f.announce_after(VM, U1, delay_s=-1)


def test_announce_after_hands_errors_to_wait() -> None:
    class Failing(RecordingFabric):
        def announce(self, vm_ip: str, host_underlay_ip: str) -> None:
            raise RuntimeError("fabric down")

    pending = Failing().announce_after(VM, U1)
    with pytest.raises(RuntimeError, match="fabric down"):
        pending.wait(5)


async def test_announce_delayed() -> None:
    f = RecordingFabric(delay=0.2)
    t0 = time.monotonic()
    await f.announce_delayed(VM, U1)
    assert len(f.calls) == 1 and f.calls[0][2] - t0 >= 0.2
    await f.announce_delayed(VM, U1, delay_s=0)
    assert len(f.calls) == 2
    # cancelled during the wait: nothing announced
    task = asyncio.create_task(f.announce_delayed(VM, U1, delay_s=5))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(f.calls) == 2
    with pytest.raises(InvalidNetValue):
        await f.announce_delayed(VM, "nope")
    await NullFabric().announce_delayed(VM, U1)  # no-op

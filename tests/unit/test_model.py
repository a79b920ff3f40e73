import pytest
from hypothesis import given, strategies as st

from ferry.model import (InstanceSpec, InvalidInput, Migration, MigrationStats, Phase, Workload,
                         parse_workload, validate_name)
from ferry.model.instance import validate_spec


def test_workload_parsing():
    assert parse_workload("idle") == Workload()
    assert parse_workload(None) == Workload()
    assert parse_workload("memload:rate=100") == Workload("memload", 100, None)
    assert parse_workload("memload:rate=5,size=64") == Workload("memload", 5, 64)


@pytest.mark.parametrize("text, words", [
    ("cpuburn", "unknown workload kind"),
    ("memload:rate=fast", "whole number"),
    ("memload:speed=1", "expected memload:rate"),
    ("memload:rate=1,rate=2", "given twice"),
    ("memload:rate=-1", "positive"),
    ("memload:size=0", "positive"),
])
def test_malformed_workloads_are_refused(text, words):
    with pytest.raises(InvalidInput, match=words):
        parse_workload(text)


@given(st.integers(0, 10_000), st.one_of(st.none(), st.integers(1, 10_000)))
def test_workload_round_trips(rate, size):
    w = Workload("memload", rate, size)
    assert parse_workload(str(w)) == w


def test_memload_default_size_is_half_the_guest():
    assert Workload("memload", 10).memload_size(512) == 256


def test_spec_validation():
    validate_spec(InstanceSpec(512, 1, Workload("memload", 100)))
    with pytest.raises(InvalidInput, match="too little"):
        validate_spec(InstanceSpec(256, 1, Workload("memload", 100, 250)))
    with pytest.raises(InvalidInput, match="memory"):
        validate_spec(InstanceSpec(64, 1))
    with pytest.raises(InvalidInput, match="on_host_maintenance"):
        validate_spec(InstanceSpec(512, 1, Workload(), "explode"))


@pytest.mark.parametrize("name", ["web-1", "db", "a1-b2"])
def test_good_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "x", "Web", "1web", "web_1", "web-", "a" * 40])
def test_bad_names(name):
    with pytest.raises(InvalidInput):
        validate_name(name)


def test_migration_round_trip_and_timeline():
    m = Migration(id="m1", vm="v", source="a", target="b", created_at=1.0)
    m.enter(Phase.PENDING, 1.0)
    m.enter(Phase.PRECOPY, 2.5)
    m.stats = MigrationStats(blackout_ms=4.2, bytes_transferred=10)
    again = Migration.from_dict(m.to_dict())
    assert again == m
    assert again.entered_at(Phase.PRECOPY) == 2.5 and again.entered_at(Phase.BLACKOUT) is None
    assert not again.done
    again.enter(Phase.ABORTED, 3.0)
    assert again.done

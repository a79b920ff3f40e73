import pytest

from ferry.controller.scheduler import check_fits, choose_host, memory_in_use
from ferry.model import HostState, InstanceSpec, InstanceState, NoCapacity
from tests.unit.fleet import host, migration, vm


def test_usage_counts_vms_and_reservations_of_migrations_in_flight():
    hosts = [host("a"), host("b")]
    vms = [vm("v1", "a", 1024), vm("v2", "a", 512), vm("off", "b", 2048, state=InstanceState.STOPPED)]
    used = memory_in_use(hosts, vms, [migration("v1", "a", "b"), migration("v2", "a", "b", done=True)])
    assert used == {"a": 1536, "b": 1024}


def test_never_overcommits_memory():
    hosts = [host("a", memory=1024)]
    used = {"a": 768}
    with pytest.raises(NoCapacity, match="a has 256 MiB free"):
        check_fits(InstanceSpec(512, 1), hosts[0], used, "v")
    check_fits(InstanceSpec(256, 1), hosts[0], used, "v")


def test_hosts_out_of_service_take_nothing():
    with pytest.raises(NoCapacity, match="draining"):
        check_fits(InstanceSpec(128, 1), host("a", state=HostState.DRAINING), {}, "v")


def test_choice_spreads_to_the_freest_host_and_explains_refusal():
    hosts = [host("a"), host("b"), host("c", memory=1024)]
    assert choose_host(InstanceSpec(512, 1), hosts, {"a": 2048, "b": 1024}, "v").name == "b"
    assert choose_host(InstanceSpec(512, 1), hosts, {"a": 2048, "b": 1024}, "v", exclude=frozenset({"b"})).name == "a"
    with pytest.raises(NoCapacity, match="no host can take big"):
        choose_host(InstanceSpec(8192, 1), hosts, {}, "big")

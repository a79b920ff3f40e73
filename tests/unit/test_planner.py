from ferry.controller.planner import FleetView, PlannerPolicy, plan_drains, plan_migrations
from ferry.model import HostProgress, HostState, Urgency
from tests.unit.fleet import event, host, migration, vm

POLICY = PlannerPolicy(notice_period_s=10, max_draining_fleet=2, max_draining_per_rack=1)


def test_urgent_events_drain_before_planned_ones():
    hosts = [host("a", rack="r1"), host("b", rack="r2"), host("c", rack="r3")]
    planned = event("p", ["a"], created=1.0)
    urgent = event("u", ["b"], urgency=Urgency.URGENT, created=5.0)
    plan = plan_drains(FleetView(hosts, [], [], [planned, urgent]), PlannerPolicy(max_draining_fleet=1), now=10)
    assert [(d.event_id, d.host) for d in plan.drains] == [("u", "b")]
    assert "fleet-wide limit" in plan.blocked["p"]


def test_one_host_per_rack_at_a_time():
    hosts = [host("a", rack="r1"), host("b", rack="r1"), host("c", rack="r2")]
    plan = plan_drains(FleetView(hosts, [], [], [event("e", ["a", "b"])]), POLICY, now=0)
    assert [d.host for d in plan.drains] == ["a"]
    assert "rack r1" in plan.blocked["e"]


def test_operator_time_is_respected():
    plan = plan_drains(FleetView([host("a"), host("b")], [], [], [event("e", ["a"], not_before=100)]), POLICY, now=50)
    assert plan.drains == []


def test_a_drain_without_room_does_not_start_and_says_why():
    hosts = [host("a", memory=2048, rack="r1"), host("b", memory=1024, rack="r2")]
    vms = [vm("big", "a", 1536), vm("resident", "b", 768)]
    plan = plan_drains(FleetView(hosts, vms, [], [event("e", ["a"])]), POLICY, now=0)
    assert plan.drains == []
    assert "no room for VM big (1536 MiB)" in plan.blocked["e"] and "b 256 MiB" in plan.blocked["e"]


def test_spare_capacity_reserve_is_kept():
    hosts = [host("a", memory=1024, rack="r1"), host("b", memory=1024, rack="r2")]
    policy = PlannerPolicy(spare_memory_mib=800)
    plan = plan_drains(FleetView(hosts, [vm("v", "a", 512)], [], [event("e", ["a"])]), policy, now=0)
    assert plan.drains == [] and "reserve" in plan.blocked["e"]


def draining_view(notices, vms=None, hosts=None, migrations=()):
    hosts = hosts or [host("a", state=HostState.DRAINING, rack="r1"), host("b", rack="r2"), host("c", rack="r3")]
    vms = vms if vms is not None else [vm("v1", "a"), vm("v2", "a")]
    e = event("e", ["a"], progress={"a": HostProgress.DRAINING.value}, notices=notices)
    return FleetView(hosts, vms, list(migrations), [e])


def test_no_migration_before_the_notice_period_has_passed():
    view = draining_view({"v1": 100.0, "v2": 100.0})
    assert plan_migrations(view, POLICY, now=105, up_to_date={}, attempts={}).migrations == []
    moves = plan_migrations(view, POLICY, now=110, up_to_date={}, attempts={}).migrations
    assert [m.vm for m in moves] == ["v1"]          # one per source at a time


def test_concurrency_limits_per_source_target_and_fleet():
    hosts = [host("a", state=HostState.DRAINING), host("d", state=HostState.DRAINING),
             host("b", rack="r2"), host("c", rack="r3")]
    vms = [vm("v1", "a"), vm("v2", "d")]
    e = event("e", ["a", "d"], progress={"a": "draining", "d": "draining"}, notices={"v1": 0.0, "v2": 0.0})
    policy = PlannerPolicy(notice_period_s=0, max_migrations_fleet=2, max_migrations_per_target=1)
    moves = plan_migrations(FleetView(hosts, vms, [], [e]), policy, now=1, up_to_date={}, attempts={}).migrations
    assert len(moves) == 2 and len({m.target for m in moves}) == 2
    busy = [migration("x", "b", "c")]
    moves = plan_migrations(FleetView(hosts, vms, busy, [e]), PlannerPolicy(notice_period_s=0, max_migrations_fleet=1),
                            now=1, up_to_date={}, attempts={}).migrations
    assert moves == []


def test_rollout_prefers_targets_that_are_not_waiting_for_maintenance():
    hosts = [host("a", state=HostState.DRAINING, rack="r1"), host("b", memory=8192, rack="r1"),
             host("c", memory=2048, rack="r2")]
    e = event("e", ["a", "b"], progress={"a": "draining", "b": "waiting"}, notices={"v1": 0.0})
    moves = plan_migrations(FleetView(hosts, [vm("v1", "a")], [], [e]), POLICY, now=20,
                            up_to_date={"b": False, "c": True}, attempts={}).migrations
    assert [(m.vm, m.target) for m in moves] == [("v1", "c")]


def test_failed_vms_are_retried_after_a_pause_then_reported():
    view = draining_view({"v1": 0.0}, vms=[vm("v1", "a")])
    assert plan_migrations(view, POLICY, 20, {}, attempts={"v1": (1, 18.0)}).migrations == []
    assert [m.vm for m in plan_migrations(view, POLICY, 30, {}, attempts={"v1": (1, 18.0)}).migrations] == ["v1"]
    stuck = plan_migrations(view, POLICY, 30, {}, attempts={"v1": (3, 18.0)})
    assert stuck.migrations == [] and "failed to migrate 3 times" in stuck.blocked["e"]


def test_terminate_vms_are_not_migrated():
    view = draining_view({"t1": 0.0}, vms=[vm("t1", "a", policy="terminate")])
    assert plan_migrations(view, POLICY, 100, {}, {}).migrations == []

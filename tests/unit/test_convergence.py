"""The convergence engine's pure parts: policies, the TOML loader, prediction, decide()."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.controller.convergence import (
    BUILTIN_POLICIES, DEFAULT_POLICY, GIB, MIB, UNLIMITED_BANDWIDTH_BYTES_S, Action, ActionKind,
    ConvergencePolicy, PolicyError, Sample, StallStep, decide, hard_stop, load_policies, plan,
    policies_from_toml_data, predict, select_policy, start,
)

BALANCED = BUILTIN_POLICIES["balanced"]
NO_POSTCOPY = BUILTIN_POLICIES["no-postcopy"]
MIN_BLACKOUT = BUILTIN_POLICIES["min-blackout"]


# ---- policies and the loader -----------------------------------------------------------------

def test_builtin_policies_are_named_valid_and_balanced_is_default():
    assert DEFAULT_POLICY == "balanced"
    assert set(BUILTIN_POLICIES) >= {"balanced", "min-blackout", "no-postcopy"}
    for name, p in BUILTIN_POLICIES.items():
        assert p.name == name
        assert p.downtime_limit_ms <= p.blackout_budget_ms
        json.dumps(p.to_dict())
    assert not NO_POSTCOPY.postcopy and NO_POSTCOPY.final_action == "abort"
    assert all(s.action != "postcopy" for s in NO_POSTCOPY.schedule)
    # balanced escalates in the documented order: downtime up to the budget, throttle, post-copy
    actions = [s.action for s in BALANCED.schedule]
    assert actions == ["raise-downtime", "raise-downtime", "throttle", "postcopy"]
    assert max(s.value for s in BALANCED.schedule if s.action == "raise-downtime") == BALANCED.blackout_budget_ms


GOOD_TOML = """
[policy.careful]
description = "a test policy"
downtime_limit_ms = 10
blackout_budget_ms = 80
max_bandwidth_mib_s = 500
postcopy = false
final_action = "abort"
completion_timeout_per_gib_s = 60
no_progress_timeout_s = 30
schedule = [
  { after = 1, action = "raise-downtime", downtime_ms = 40 },
  { after = 3, action = "raise-downtime", downtime_ms = 80 },
  { after = 4, action = "throttle", percent = 60 },
  { after = 6, action = "abort" },
]

[policy.balanced]
downtime_limit_ms = 15
schedule = [{ after = 2, action = "postcopy" }]
"""


def test_loader_reads_policies_and_keeps_builtins(tmp_path: Path):
    f = tmp_path / "p.toml"
    f.write_text(GOOD_TOML)
    policies = load_policies(f)
    careful = policies["careful"]
    assert careful.max_bandwidth_mib_s == 500 and not careful.postcopy
    assert careful.schedule == (StallStep(1, "raise-downtime", 40), StallStep(3, "raise-downtime", 80),
                                StallStep(4, "throttle", 60), StallStep(6, "abort"))
    assert policies["balanced"].downtime_limit_ms == 15          # a file policy replaces a built-in
    assert policies["no-postcopy"] is BUILTIN_POLICIES["no-postcopy"]
    assert set(load_policies(f, include_builtin=False)) == {"careful", "balanced"}
    # the round trip through to_dict gives the same policy
    d = careful.to_dict()
    name = d.pop("name")
    assert policies_from_toml_data({"policy": {name: d}}, include_builtin=False)[name] == careful


BAD = [
    ("unknown action", '[policy.x]\nschedule = [{after = 1, action = "reboot"}]', "unknown action 'reboot'"),
    ("non-increasing", '[policy.x]\nschedule = [{after = 2, action = "raise-downtime", downtime_ms = 50},'
                       '{after = 2, action = "postcopy"}]', "does not increase"),
    ("decreasing", '[policy.x]\nschedule = [{after = 3, action = "raise-downtime", downtime_ms = 50},'
                   '{after = 1, action = "postcopy"}]', "strictly increasing"),
    ("downtime down", '[policy.x]\nschedule = [{after = 1, action = "raise-downtime", downtime_ms = 50},'
                      '{after = 2, action = "raise-downtime", downtime_ms = 40}]', "does not raise it"),
    ("over budget", '[policy.x]\nblackout_budget_ms = 60\nschedule = [{after = 1, action = "raise-downtime", '
                    'downtime_ms = 70}]', "exceeds the blackout budget"),
    ("throttle range", '[policy.x]\nschedule = [{after = 1, action = "throttle", percent = 100}]', "1-99"),
    ("postcopy not allowed", '[policy.x]\npostcopy = false\nfinal_action = "abort"\n'
                             'schedule = [{after = 1, action = "postcopy"}]', "postcopy = false"),
    ("final postcopy not allowed", '[policy.x]\npostcopy = false', "final_action 'postcopy' but postcopy = false"),
    ("unknown final", '[policy.x]\nfinal_action = "pray"', "unknown final_action"),
    ("after terminal", '[policy.x]\nschedule = [{after = 1, action = "abort"},'
                       '{after = 2, action = "throttle", percent = 50}]', "ends the schedule"),
    ("missing value", '[policy.x]\nschedule = [{after = 1, action = "throttle"}]', "needs percent"),
    ("stray value", '[policy.x]\nschedule = [{after = 1, action = "postcopy", percent = 3}]', "unknown key 'percent'"),
    ("missing after", '[policy.x]\nschedule = [{action = "postcopy"}]', "missing 'after'"),
    ("zero after", '[policy.x]\nschedule = [{after = 0, action = "postcopy"}]', ">= 1"),
    ("unknown key", '[policy.x]\ndowntime = 5', "unknown key 'downtime'"),
    ("multifd+postcopy", '[policy.x]\nmultifd_channels = 4', "multifd cannot be combined with post-copy"),
    ("sample interval", '[policy.x]\nsample_interval_s = 1.0', "between 0.1 and 0.25"),
    ("negative timeout", '[policy.x]\nno_progress_timeout_s = -1', "no_progress_timeout_s must be"),
    ("bool as int", '[policy.x]\ndowntime_limit_ms = true', "whole number"),
    ("initial above budget", '[policy.x]\ndowntime_limit_ms = 200\nblackout_budget_ms = 100', "exceeds"),
    ("bad strategy", '[policy.x]\nstrategy = "yolo"', "unknown strategy"),
    ("bad name", '[policy."Bad Name"]', "policy name"),
    ("no tables", 'foo = 1', "unknown top-level key"),
    ("not toml", '[policy.x\n', "not valid TOML"),
]


@pytest.mark.parametrize("what,text,message", BAD, ids=[b[0] for b in BAD])
def test_loader_refuses_bad_policies_with_one_line(tmp_path: Path, what: str, text: str, message: str):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policies(f)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert str(f) in str(e.value)


def test_loader_missing_file(tmp_path: Path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policies(tmp_path / "nope.toml")


def test_policy_error_is_a_value_error():
    assert issubclass(PolicyError, ValueError)
    with pytest.raises(ValueError):
        ConvergencePolicy(name="x", schedule=(StallStep(1, "explode"),))


def test_select_policy_vm_beats_event_beats_default():
    p, why = select_policy(BUILTIN_POLICIES)
    assert p.name == "balanced" and "default" in why
    p, why = select_policy(BUILTIN_POLICIES, event="min-blackout")
    assert p.name == "min-blackout" and "maintenance event" in why
    p, why = select_policy(BUILTIN_POLICIES, vm="no-postcopy", event="min-blackout")
    assert p.name == "no-postcopy" and "vm" in why
    with pytest.raises(PolicyError, match="unknown convergence policy 'fast'"):
        select_policy(BUILTIN_POLICIES, event="fast")


# ---- QEMU set-up (the dict that ferry.qemu.convergence.prepare applies) -----------------------

def test_qemu_setup_of_balanced_enables_what_it_may_use_later():
    s = BALANCED.qemu_setup()
    src, dst = s["source"], s["target"]
    assert src["capabilities"]["postcopy-ram"] and dst["capabilities"]["postcopy-ram"]
    assert dst["capabilities"]["postcopy-blocktime"]
    assert src["capabilities"]["auto-converge"]               # it has a throttle step
    assert src["parameters"]["max-cpu-throttle"] == 1         # ...dormant until then
    assert src["parameters"]["max-bandwidth"] == UNLIMITED_BANDWIDTH_BYTES_S
    assert src["parameters"]["max-postcopy-bandwidth"] == 0   # unlimited
    assert src["parameters"]["downtime-limit"] == 10
    assert not src["capabilities"]["xbzrle"] and not src["capabilities"]["multifd"]


def test_qemu_setup_applies_a_link_cap_to_both_phases_and_turns_unused_things_off():
    s = MIN_BLACKOUT.qemu_setup(link_cap_bytes_s=100 * MIB)
    assert s["source"]["parameters"]["max-bandwidth"] == 100 * MIB
    assert s["source"]["parameters"]["max-postcopy-bandwidth"] == 100 * MIB
    assert s["source"]["capabilities"]["auto-converge"] is False
    assert "max-cpu-throttle" not in s["source"]["parameters"]
    s = NO_POSTCOPY.qemu_setup()
    assert s["source"]["capabilities"]["postcopy-ram"] is False
    assert s["target"]["capabilities"]["postcopy-blocktime"] is False


def test_qemu_setup_with_xbzrle_and_multifd():
    p = ConvergencePolicy(name="wan", postcopy=False, final_action="abort", xbzrle=True, xbzrle_cache_mib=256,
                          multifd_channels=4)
    s = p.qemu_setup()
    assert s["source"]["capabilities"]["xbzrle"] and s["target"]["capabilities"]["xbzrle"]
    assert s["source"]["parameters"]["xbzrle-cache-size"] == 256 * MIB
    assert s["source"]["parameters"]["multifd-channels"] == 4 == s["target"]["parameters"]["multifd-channels"]


# ---- prediction ---------------------------------------------------------------------------------

def test_idle_guest_converges_after_one_pass():
    p = predict(512 * MIB, 0, 256 * MIB, 20)
    assert p.converges and p.strategy == "precopy" and p.iterations == 1
    assert p.precopy_s == pytest.approx(2.0)
    assert p.blackout_ms == pytest.approx(5.0)           # only the fixed overhead


def test_slow_dirtier_converges_geometrically():
    p = predict(1 * GIB, 50 * MIB, 500 * MIB, 20)
    assert p.converges and p.strategy == "precopy"
    assert p.iterations >= 3
    assert 2.048 < p.precopy_s < 2.048 / (1 - 0.1) + 0.01   # first pass / (1 - ratio)
    assert p.blackout_ms <= 20 + 5


def test_fast_dirtier_does_not_converge_and_goes_postcopy():
    p = predict(1 * GIB, 800 * MIB, 128 * MIB, 300)
    assert not p.converges and p.precopy_s is None
    assert p.strategy == "postcopy-after-first-pass"
    assert p.postcopy_s == pytest.approx(8 + 8)            # first pass, then all of memory once more
    q = predict(1 * GIB, 800 * MIB, 128 * MIB, 300, postcopy_allowed=False)
    assert q.strategy == "precopy-escalate" and q.blackout_ms is None


def test_ratio_threshold_and_time_limit_choose_postcopy():
    # converges, but the guest dirties 0.6 of the bandwidth
    p = predict(512 * MIB, 60 * MIB, 100 * MIB, 20, postcopy_dirty_ratio=0.5)
    assert p.converges and p.strategy == "postcopy-after-first-pass"
    assert predict(512 * MIB, 60 * MIB, 100 * MIB, 20, postcopy_dirty_ratio=0.7).strategy == "precopy"
    # too slow for the time allowed
    assert predict(512 * MIB, 60 * MIB, 100 * MIB, 20, postcopy_dirty_ratio=0.7,
                   max_precopy_s=5).strategy == "postcopy-after-first-pass"


def test_plan_honours_forced_strategies():
    assert plan(NO_POSTCOPY, GIB, 800 * MIB, 100 * MIB).strategy == "precopy-escalate"
    assert plan(NO_POSTCOPY, GIB, 10 * MIB, 100 * MIB).strategy == "precopy"
    forced = dataclasses.replace(BALANCED, name="always-pc", strategy="postcopy")
    assert plan(forced, GIB, 0, 100 * MIB).strategy == "postcopy-after-first-pass"


def test_predict_rejects_nonsense():
    for args in ((0, 1, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0)):
        with pytest.raises(ValueError):
            predict(*args)


@settings(max_examples=300, deadline=None)
@given(mem_mib=st.integers(64, 64 * 1024), dirty=st.floats(0, 5000), bw=st.floats(1, 20000),
       limit=st.integers(1, 2000))
def test_prediction_is_consistent(mem_mib, dirty, bw, limit):
    p = predict(mem_mib * MIB, dirty * MIB, bw * MIB, limit)
    assert p.first_pass_s == pytest.approx(mem_mib / bw)
    if p.converges:
        assert p.precopy_s is not None and p.precopy_s >= p.first_pass_s - 1e-9
        assert p.precopy_blackout_ms <= limit + 5.0 + 1e-6
    else:
        assert p.precopy_s is None and p.precopy_blackout_ms is None
    if dirty >= bw and mem_mib / bw * 1000 > limit:
        assert not p.converges or p.iterations == 1
    # a faster link never makes pre-copy slower or stop converging
    q = predict(mem_mib * MIB, dirty * MIB, bw * 2 * MIB, limit)
    if p.converges:
        assert q.converges
    json.dumps(p.to_dict())


# ---- decide() ---------------------------------------------------------------------------------

class Sim:
    """Feeds decide() a scripted migration: one sample every 0.2 s."""

    def __init__(self, policy: ConvergencePolicy, memory: int = 512 * MIB, dirty: float = 0,
                 bandwidth: float = 100 * MIB):
        self.policy = policy
        self.now = 1000.0
        self.prediction = plan(policy, memory, dirty, bandwidth)
        self.state = start(policy, self.prediction, memory, self.now)
        self.actions: list[Action] = []

    def feed(self, status="active", remaining=0, transferred=0, sync=1, dt=0.2, **kw):
        self.now += dt
        sample = {"status": status, "remaining": remaining, "transferred": transferred,
                  "dirty_sync_count": sync, "page_size": 4096, **kw}
        acts, self.state = decide(self.policy, self.state, sample, self.now)
        self.actions += acts
        return acts

    def kinds(self):
        return [a.kind for a in self.actions]


def _stalled_iterations(sim: Sim, n: int, dirty_set=300 * MIB, start_sync=2, per_iteration=5):
    """n more iterations, each re-sending the same dirty set (no progress)."""
    transferred = 600 * MIB
    for i in range(n):
        for k in range(per_iteration):
            transferred += dirty_set // per_iteration
            sim.feed(remaining=dirty_set - k * dirty_set // per_iteration, transferred=transferred,
                     sync=start_sync + i, total_time_ms=int((sim.now - 1000) * 1000))


def test_completed_and_failed_end_the_loop_without_actions():
    sim = Sim(BALANCED)
    assert sim.feed(status="setup", sync=0) == []
    assert sim.feed(remaining=100, transferred=10) == []
    assert sim.feed(status="completed") == []
    assert sim.state.done and sim.state.outcome == "completed"
    assert sim.feed(status="active") == []             # nothing after the end
    sim = Sim(BALANCED)
    sim.feed(status="failed", error="boom")
    assert sim.state.outcome == "failed" and "boom" in sim.state.decisions[-1].reason


def test_balanced_switches_to_postcopy_after_the_first_pass_when_predicted_not_to_converge():
    sim = Sim(BALANCED, dirty=800 * MIB, bandwidth=100 * MIB)
    assert sim.state.strategy == "postcopy-after-first-pass"
    for i in range(10):
        assert sim.feed(remaining=(500 - 45 * i) * MIB, transferred=45 * i * MIB, sync=1) == []
    # the first sync after the bulk pass: the guest still dirtied a lot (QEMU's rate 90 MiB/s)
    acts = sim.feed(remaining=380 * MIB, transferred=470 * MIB, sync=2, dirty_pages_rate=90 * 256,
                    total_time_ms=4700)
    assert [a.kind for a in acts] == [ActionKind.POSTCOPY]
    assert "post-copy" in acts[0].reason and acts[0].reason
    assert sim.state.phase == "postcopy-requested"
    # no second request while QEMU switches, then watch only
    assert sim.feed(remaining=370 * MIB, transferred=480 * MIB, sync=2) == []
    assert sim.feed(status="postcopy-active", remaining=300 * MIB, sync=3) == []
    assert sim.state.phase == "postcopy"
    sim.now += 3600                                       # timeouts no longer apply in post-copy
    assert sim.feed(status="postcopy-active", remaining=1, sync=3) == []
    log = sim.state.decision_log()
    assert any(d["kind"] == "postcopy" and d["reason"] for d in log)
    assert "cannot be rolled back" in log[-1]["reason"]


def test_repredicition_with_observed_numbers_can_keep_precopy():
    # measured before migrate: looks hopeless at the guessed bandwidth ...
    sim = Sim(BALANCED, dirty=400 * MIB, bandwidth=256 * MIB)
    assert sim.state.strategy == "postcopy-after-first-pass"
    for i in range(5):
        sim.feed(remaining=(500 - 100 * i) * MIB, transferred=100 * i * MIB, sync=1)
    # ... but the first pass moved 700 MiB/s and the guest only dirtied 150 MiB/s meanwhile
    acts = sim.feed(remaining=100 * MIB, transferred=700 * MIB, sync=2, dirty_pages_rate=150 * 256,
                    total_time_ms=1000)
    assert acts == []
    assert sim.state.strategy == "precopy"
    assert any("strategy postcopy-after-first-pass -> precopy" in d.reason for d in sim.state.decisions)


def test_stall_schedule_escalates_in_order_then_final_action():
    policy = dataclasses.replace(BALANCED, name="t", strategy="precopy", completion_timeout_per_gib_s=1000,
                                 no_progress_timeout_s=1000)
    sim = Sim(policy, dirty=10 * MIB, bandwidth=100 * MIB)
    assert sim.state.strategy == "precopy"
    sim.feed(remaining=400 * MIB, transferred=100 * MIB, sync=1)
    _stalled_iterations(sim, 6)
    kinds = sim.kinds()
    assert kinds == [ActionKind.SET_DOWNTIME, ActionKind.SET_DOWNTIME, ActionKind.THROTTLE, ActionKind.POSTCOPY]
    assert sim.actions[0].params == {"downtime_limit_ms": 30}
    assert sim.actions[1].params == {"downtime_limit_ms": 100}
    assert sim.actions[2].params == {"percent": 50}
    assert all("iterations without progress" in a.reason for a in sim.actions)
    assert sim.state.downtime_ms == 100 and sim.state.throttle_pct == 50


def test_progress_resets_the_stall_count():
    policy = dataclasses.replace(BALANCED, name="t", strategy="precopy", completion_timeout_per_gib_s=1000,
                                 no_progress_timeout_s=1000)
    sim = Sim(policy, dirty=10 * MIB, bandwidth=100 * MIB)
    sim.feed(remaining=400 * MIB, transferred=100 * MIB, sync=1)
    transferred = 500 * MIB
    for i, dirty_set in enumerate([300, 200, 120, 80, 40, 20, 10]):     # shrinking: always progress
        transferred += dirty_set * MIB
        sim.feed(remaining=dirty_set * MIB, transferred=transferred, sync=2 + i)
    assert sim.actions == [] and sim.state.stalled == 0


def test_no_postcopy_policy_aborts_at_its_completion_timeout():
    sim = Sim(NO_POSTCOPY, memory=512 * MIB, dirty=800 * MIB, bandwidth=100 * MIB)
    assert sim.state.strategy == "precopy-escalate"
    t = 0
    while not sim.actions or sim.actions[-1].kind is not ActionKind.ABORT:
        t += 1
        sim.feed(remaining=max(1, 500 - t * 20) * MIB if t < 25 else 380 * MIB,
                 transferred=t * 20 * MIB, sync=1 if t < 25 else 2 + (t - 25) // 19)
        assert t < 1000
    abort = sim.actions[-1]
    assert abort.params["retry_after_s"] == NO_POSTCOPY.retry_after_s
    assert "not completed within 15 s" in abort.reason and "abort" in abort.reason
    assert sim.now - 1000 == pytest.approx(15.2, abs=0.3)
    assert ActionKind.POSTCOPY not in sim.kinds()
    assert sim.state.phase == "aborting"
    assert sim.feed(remaining=380 * MIB) == []             # waits for the cancel
    sim.feed(status="cancelled")
    assert sim.state.outcome == "cancelled"


def test_no_progress_timeout_ends_in_the_final_action():
    policy = dataclasses.replace(BALANCED, name="t", strategy="precopy", schedule=(),
                                 completion_timeout_per_gib_s=1000, no_progress_timeout_s=3)
    sim = Sim(policy, dirty=10 * MIB, bandwidth=100 * MIB)
    for _ in range(30):                                   # remaining never gets lower
        sim.feed(remaining=400 * MIB, transferred=100 * MIB, sync=1)
    assert sim.kinds() == [ActionKind.POSTCOPY]
    assert "no progress for 3 s" in sim.actions[0].reason and "switch to post-copy" in sim.actions[0].reason


def test_postcopy_that_never_starts_is_aborted():
    sim = Sim(BALANCED, dirty=800 * MIB, bandwidth=100 * MIB)
    sim.feed(remaining=10 * MIB, transferred=500 * MIB, sync=1)
    sim.feed(remaining=380 * MIB, transferred=520 * MIB, sync=2, total_time_ms=5000, dirty_pages_rate=90 * 256)
    assert sim.kinds() == [ActionKind.POSTCOPY]
    for _ in range(60):
        sim.feed(remaining=380 * MIB, transferred=520 * MIB, sync=2)
    assert sim.kinds() == [ActionKind.POSTCOPY, ActionKind.ABORT]
    assert "did not switch" in sim.actions[-1].reason


def test_hard_stop():
    sim = Sim(BALANCED)
    sim.feed(remaining=400 * MIB, transferred=100 * MIB)
    acts, state = hard_stop(BALANCED, sim.state, {"status": "active"}, sim.now + 1, "window closes")
    assert [a.kind for a in acts] == [ActionKind.POSTCOPY]
    acts, state = hard_stop(BALANCED, sim.state, {"status": "active"}, sim.now + 1, "operator", abort=True)
    assert [a.kind for a in acts] == [ActionKind.ABORT] and state.phase == "aborting"
    acts, _ = hard_stop(BALANCED, state, {"status": "active"}, sim.now + 2, "again", abort=True)
    assert acts == []
    acts, _ = hard_stop(BALANCED, sim.state, {"status": "postcopy-active"}, sim.now + 1, "late")
    assert acts == []


def test_action_round_trip_and_sample_from_agent_dict():
    a = Action(ActionKind.THROTTLE, {"percent": 40}, "why")
    assert Action.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    s = Sample.from_dict({"status": "active", "remaining": 5, "transferred": 7, "total": 9, "dirty_sync_count": 2,
                          "dirty_pages_rate": 3, "page_size": 4096, "mbps": 1.0, "dirty_rate_mib_s": 0.0,
                          "total_time_ms": 10, "expected_downtime_ms": None, "error": None})
    assert (s.remaining, s.transferred, s.dirty_sync_count, s.total_time_ms) == (5, 7, 2, 10)


@settings(max_examples=200, deadline=None)
@given(policy=st.sampled_from(sorted(BUILTIN_POLICIES)),
       samples=st.lists(st.tuples(st.sampled_from(["setup", "active", "active", "active", "postcopy-active",
                                                   "completed", "cancelled"]),
                                  st.integers(0, 2 * GIB), st.integers(0, 3),
                                  st.floats(0.05, 5.0)), max_size=80),
       dirty=st.floats(0, 1000), bw=st.floats(10, 2000))
def test_decide_invariants(policy, samples, dirty, bw):
    """Whatever QEMU reports: every action has a reason, post-copy only where allowed, at most one
    post-copy request and one abort, nothing after a final status, and the log holds every action."""
    p = BUILTIN_POLICIES[policy]
    sim = Sim(p, memory=GIB, dirty=dirty * MIB, bandwidth=bw * MIB)
    sync, transferred, finished_at = 0, 0, None
    for status, remaining, dsync, dt in samples:
        sync += dsync
        transferred += remaining // 4
        acts = sim.feed(status=status, remaining=remaining, transferred=transferred, sync=sync, dt=dt)
        if finished_at is not None:
            assert acts == []
        if status in ("completed", "cancelled") and finished_at is None:
            finished_at = len(sim.actions)
        for a in acts:
            assert a.reason
            if a.kind is ActionKind.POSTCOPY:
                assert p.postcopy
            if a.kind is ActionKind.SET_DOWNTIME:
                assert a.params["downtime_limit_ms"] <= p.blackout_budget_ms
    kinds = sim.kinds()
    assert kinds.count(ActionKind.POSTCOPY) <= 1
    assert kinds.count(ActionKind.ABORT) <= 1
    logged = [d.kind for d in sim.state.decisions if d.kind != "note"]
    assert logged == [k.value for k in kinds]
    json.dumps(sim.state.decision_log())


def test_the_policy_file_in_the_repo_restates_the_builtins():
    path = Path(__file__).resolve().parents[2] / "bench" / "convergence" / "policies.toml"
    policies = load_policies(path, include_builtin=False)
    for name, builtin in BUILTIN_POLICIES.items():
        assert policies[name] == builtin, name
    assert policies["no-postcopy-xbzrle"].xbzrle and policies["no-postcopy-multifd"].multifd_channels == 2


def test_unsafe_options_flags_xbzrle_under_tcg_only():
    from ferry.controller.convergence import unsafe_options
    xb = ConvergencePolicy(name="xb", postcopy=False, final_action="abort", xbzrle=True)
    assert unsafe_options(xb, "tcg") and "XBZRLE" in unsafe_options(xb, "tcg")[0]
    assert unsafe_options(xb, "kvm") == []
    assert all(unsafe_options(p, "tcg") == [] for p in BUILTIN_POLICIES.values())

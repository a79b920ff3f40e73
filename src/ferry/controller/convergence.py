"""Convergence engine: named policies written as data, a pre-copy model, and the
pure decision function a migration's monitor loop calls on every sample.

Nothing here does I/O. The effects live in `ferry.qemu.convergence` (QMP) and
`ferry.qemu.dirtyrate` (measuring the guest); the migrator glues them:

    dirty  = await measure_dirty_rate(qmp_source)                  # before migrate
    pred   = plan(policy, memory_bytes, dirty, bandwidth)          # prediction + strategy
    state  = start(policy, pred, memory_bytes, now)
    await prepare(qmp_source, qmp_target, policy.qemu_setup(link_cap))
    migrate ...
    every policy.sample_interval_s:
        actions, state = decide(policy, state, Sample.from_dict(sample.to_dict()), now)
        for a in actions: await apply_action(qmp_source, a.to_dict())
    m.decisions = [d.to_dict() for d in state.decisions]

Layering: `controller` may not import `qemu`, so actions and the QEMU set-up
cross that boundary as plain dicts (`Action.to_dict()`, `qemu_setup()`), which
is also what travels from controller to agent over HTTP.

Stall unit. A schedule step fires after `after` *dirty-sync iterations
without progress* (QEMU's `dirty-sync-count`), as in oVirt vdsm's
convergence schedule. An iteration is the unit in which pre-copy either
shrinks what it still has to send or does not; counting iterations makes a
schedule independent of guest size and link speed (an iteration of a 1 GiB
working set at 100 MiB/s takes 10 s, at 1 GiB/s 1 s). Time-based limits are
the two timeouts (completion per GiB, no progress), which end every
migration in the policy's final action.

Progress. After the first full pass, each new iteration's dirty set is
estimated from the first sample that sees it (`remaining` plus half the bytes
sent since the previous sample, since the sync happened somewhere in that
interval). The iteration made progress when that estimate is at least
`progress_margin` (10 %) below the best one so far. During the first pass,
progress is a new low of `remaining` (as in KubeVirt's progress timeout).
"""
from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
GIB = 1024 * MIB
# QEMU treats max-bandwidth as a rate limit; "unlimited" is just a very large one.
UNLIMITED_BANDWIDTH_BYTES_S = 64 * GIB
# QEMU 7.2 bounds: downtime-limit is at most 2000 s; throttle percentages 1..99.
MAX_DOWNTIME_MS = 2_000_000
# QEMU states in which the monitor loop has nothing left to decide.
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
POSTCOPY_STATUSES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})


class PolicyError(ValueError):
    """A convergence policy is invalid; the message is one line for the user."""


# ---- actions -----------------------------------------------------------------------------

class ActionKind(str, Enum):
    """What the monitor loop asks the source QEMU to do; each maps to exactly one QMP call.

    set-downtime   migrate-set-parameters {"downtime-limit": ms}
    set-bandwidth  migrate-set-parameters {"max-bandwidth": bytes/s}
    throttle       migrate-set-parameters {"max-cpu-throttle": p, "cpu-throttle-increment": p}
                   (auto-converge is enabled up front, dormant at 1 %; see qemu_setup)
    postcopy       migrate-start-postcopy
    abort          migrate_cancel (the migrator then rolls back: target first, then source)
    """

    SET_DOWNTIME = "set-downtime"
    SET_BANDWIDTH = "set-bandwidth"
    THROTTLE = "throttle"
    POSTCOPY = "postcopy"
    ABORT = "abort"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    params: dict = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "params": dict(self.params), "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Action":
        return cls(ActionKind(d["kind"]), dict(d.get("params") or {}), d.get("reason", ""))


@dataclass(frozen=True)
class Decision:
    """One line of a migration's decision log: an action taken, or a note, with its reason."""

    elapsed_s: float            # seconds since the monitor loop started
    kind: str                   # an ActionKind value, or "note"
    reason: str
    params: dict = field(default_factory=dict)
    status: str = ""            # QEMU's migration status when decided
    iteration: int = 0          # QEMU's dirty-sync-count when decided

    def to_dict(self) -> dict:
        return asdict(self)


# ---- policies ----------------------------------------------------------------------------

STEP_ACTIONS = ("raise-downtime", "throttle", "postcopy", "abort")
FINAL_ACTIONS = ("postcopy", "abort")
STRATEGIES = ("auto", "precopy", "postcopy")
_STEP_VALUE_KEY = {"raise-downtime": "downtime_ms", "throttle": "percent"}


@dataclass(frozen=True)
class StallStep:
    """Take `action` once the migration has gone `after` dirty-sync iterations without progress."""

    after: int
    action: str                 # raise-downtime | throttle | postcopy | abort
    value: int | None = None    # downtime_ms for raise-downtime, percent for throttle

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"after": self.after, "action": self.action}
        if self.action in _STEP_VALUE_KEY:
            d[_STEP_VALUE_KEY[self.action]] = self.value
        return d


@dataclass(frozen=True)
class ConvergencePolicy:
    """A named convergence policy: initial settings, a stall schedule, a final action, timeouts."""

    name: str
    description: str = ""
    # initial settings
    downtime_limit_ms: int = 20
    blackout_budget_ms: int = 100         # raise-downtime never goes above this
    max_bandwidth_mib_s: int = 0          # 0 = unlimited (a very large max-bandwidth)
    postcopy: bool = True                 # may this VM's migration switch to post-copy?
    xbzrle: bool = False
    xbzrle_cache_mib: int = 64
    multifd_channels: int = 0             # 0 = off
    # strategy before the first sample: auto = from the prediction
    strategy: str = "auto"
    postcopy_dirty_ratio: float = 0.5     # auto: post-copy after the first pass when dirty/bandwidth >= this
    # escalation
    schedule: tuple[StallStep, ...] = ()
    final_action: str = "postcopy"        # what the timeouts end in
    completion_timeout_per_gib_s: float = 30.0
    completion_timeout_min_s: float = 10.0
    no_progress_timeout_s: float = 20.0
    postcopy_switch_timeout_s: float = 10.0   # post-copy requested but QEMU did not switch: abort
    progress_margin: float = 0.1
    retry_after_s: float = 300.0          # an abort asks the scheduler to retry after this long
    sample_interval_s: float = 0.2

    def __post_init__(self) -> None:
        validate(self)

    # -- derived ------------------------------------------------------------------------
    def completion_timeout_s(self, memory_bytes: int) -> float:
        return max(self.completion_timeout_min_s, self.completion_timeout_per_gib_s * memory_bytes / GIB)

    @property
    def uses_throttle(self) -> bool:
        return any(s.action == "throttle" for s in self.schedule)

    @property
    def may_postcopy(self) -> bool:
        return self.postcopy

    def bandwidth_bytes_s(self, link_cap_bytes_s: float | None = None) -> int:
        """The max-bandwidth to set: the policy's (0 = unlimited), within the link's cap if any."""
        bw = self.max_bandwidth_mib_s * MIB if self.max_bandwidth_mib_s else UNLIMITED_BANDWIDTH_BYTES_S
        if link_cap_bytes_s:
            bw = min(bw, int(link_cap_bytes_s))
        return int(bw)

    def qemu_setup(self, link_cap_bytes_s: float | None = None) -> dict:
        """Capabilities and parameters for both ends, set before `migrate` (wire format of
        `ferry.qemu.convergence.prepare`). Every capability ferry manages is set explicitly,
        on or off, so a VM that migrated before starts from a known state."""
        bw = self.bandwidth_bytes_s(link_cap_bytes_s)
        caps_common = {
            "events": True,
            "postcopy-ram": self.postcopy,
            "xbzrle": self.xbzrle,
            "multifd": self.multifd_channels > 0,
        }
        src_params: dict[str, Any] = {
            "downtime-limit": self.downtime_limit_ms,
            "max-bandwidth": bw,
            # post-copy has its own limit (0 = unlimited); a link cap applies to it too
            "max-postcopy-bandwidth": bw if bw < UNLIMITED_BANDWIDTH_BYTES_S else 0,
        }
        if self.uses_throttle:
            # auto-converge can only be enabled before `migrate`; it starts dormant at 1 %
            # (QEMU raises it only up to max-cpu-throttle) and a throttle step lifts it.
            src_params.update({"cpu-throttle-initial": 1, "max-cpu-throttle": 1,
                               "cpu-throttle-increment": 1, "cpu-throttle-tailslow": False})
        if self.xbzrle:
            src_params["xbzrle-cache-size"] = self.xbzrle_cache_mib * MIB
        dst_params: dict[str, Any] = {}
        if self.multifd_channels:
            src_params["multifd-channels"] = self.multifd_channels
            dst_params["multifd-channels"] = self.multifd_channels
        return {
            "source": {"capabilities": {**caps_common, "auto-converge": self.uses_throttle},
                       "parameters": src_params},
            "target": {"capabilities": {**caps_common, "postcopy-blocktime": self.postcopy},
                       "parameters": dst_params},
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = [s.to_dict() for s in self.schedule]
        return d


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def validate(p: ConvergencePolicy) -> None:
    """Raise PolicyError (one line) if the policy cannot be executed as written."""
    where = f"policy {p.name!r}"
    if not isinstance(p.name, str) or not _NAME_RE.match(p.name):
        raise PolicyError(f"policy name {p.name!r} must be 1-63 characters of [a-z0-9_-]")

    def positive(key: str, v: float, allow_zero: bool = False) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) \
                or (v < 0 if allow_zero else v <= 0):
            raise PolicyError(f"{where}: {key} must be a number {'>= 0' if allow_zero else '> 0'}, got {v!r}")

    positive("downtime_limit_ms", p.downtime_limit_ms)
    positive("blackout_budget_ms", p.blackout_budget_ms)
    positive("max_bandwidth_mib_s", p.max_bandwidth_mib_s, allow_zero=True)
    positive("xbzrle_cache_mib", p.xbzrle_cache_mib)
    positive("multifd_channels", p.multifd_channels, allow_zero=True)
    positive("postcopy_dirty_ratio", p.postcopy_dirty_ratio, allow_zero=True)
    positive("completion_timeout_per_gib_s", p.completion_timeout_per_gib_s)
    positive("completion_timeout_min_s", p.completion_timeout_min_s, allow_zero=True)
    positive("no_progress_timeout_s", p.no_progress_timeout_s)
    positive("postcopy_switch_timeout_s", p.postcopy_switch_timeout_s)
    positive("retry_after_s", p.retry_after_s, allow_zero=True)
    for key in ("postcopy", "xbzrle"):
        if not isinstance(getattr(p, key), bool):
            raise PolicyError(f"{where}: {key} must be true or false, got {getattr(p, key)!r}")
    if p.downtime_limit_ms > MAX_DOWNTIME_MS or p.blackout_budget_ms > MAX_DOWNTIME_MS:
        raise PolicyError(f"{where}: downtime limits above {MAX_DOWNTIME_MS} ms are not accepted by QEMU")
    if p.downtime_limit_ms > p.blackout_budget_ms:
        raise PolicyError(f"{where}: downtime_limit_ms {p.downtime_limit_ms} exceeds the blackout budget "
                          f"{p.blackout_budget_ms} ms")
    if not 0 <= p.progress_margin < 1:
        raise PolicyError(f"{where}: progress_margin must be in [0, 1), got {p.progress_margin!r}")
    if not 0.1 <= p.sample_interval_s <= 0.25:
        raise PolicyError(f"{where}: sample_interval_s must be between 0.1 and 0.25 s, got {p.sample_interval_s!r}")
    if p.strategy not in STRATEGIES:
        raise PolicyError(f"{where}: unknown strategy {p.strategy!r} (known: {', '.join(STRATEGIES)})")
    if p.strategy == "postcopy" and not p.postcopy:
        raise PolicyError(f"{where}: strategy 'postcopy' but postcopy = false")
    if p.final_action not in FINAL_ACTIONS:
        raise PolicyError(f"{where}: unknown final_action {p.final_action!r} (known: {', '.join(FINAL_ACTIONS)})")
    if p.final_action == "postcopy" and not p.postcopy:
        raise PolicyError(f"{where}: final_action 'postcopy' but postcopy = false")
    if p.multifd_channels and p.postcopy:
        raise PolicyError(f"{where}: multifd cannot be combined with post-copy in QEMU 7.2 "
                          "(set multifd_channels = 0 or postcopy = false)")
    if p.multifd_channels > 255:
        raise PolicyError(f"{where}: multifd_channels must be at most 255")

    last_after, last_downtime, last_throttle = 0, p.downtime_limit_ms, 0
    for i, step in enumerate(p.schedule, 1):
        at = f"{where}: schedule step {i}"
        if not isinstance(step, StallStep):
            raise PolicyError(f"{at}: not a schedule step")
        if step.action not in STEP_ACTIONS:
            raise PolicyError(f"{at}: unknown action {step.action!r} (known: {', '.join(STEP_ACTIONS)})")
        if isinstance(step.after, bool) or not isinstance(step.after, int) or step.after < 1:
            raise PolicyError(f"{at}: after must be a whole number of iterations >= 1, got {step.after!r}")
        if step.after <= last_after:
            raise PolicyError(f"{at}: after = {step.after} does not increase (previous step: after = "
                              f"{last_after}); the schedule must be strictly increasing")
        last_after = step.after
        if i > 1 and p.schedule[i - 2].action in FINAL_ACTIONS:
            raise PolicyError(f"{at}: comes after a {p.schedule[i - 2].action!r} step, which ends the schedule")
        if step.action in _STEP_VALUE_KEY:
            if isinstance(step.value, bool) or not isinstance(step.value, int):
                raise PolicyError(f"{at}: {step.action} needs a whole number {_STEP_VALUE_KEY[step.action]}")
        elif step.value is not None:
            raise PolicyError(f"{at}: {step.action} takes no value")
        if step.action == "raise-downtime":
            if step.value <= last_downtime:
                raise PolicyError(f"{at}: raise-downtime to {step.value} ms does not raise it "
                                  f"(already {last_downtime} ms)")
            if step.value > p.blackout_budget_ms:
                raise PolicyError(f"{at}: raise-downtime to {step.value} ms exceeds the blackout budget "
                                  f"{p.blackout_budget_ms} ms")
            last_downtime = step.value
        elif step.action == "throttle":
            if not 1 <= step.value <= 99:
                raise PolicyError(f"{at}: throttle percent must be 1-99, got {step.value}")
            if step.value <= last_throttle:
                raise PolicyError(f"{at}: throttle to {step.value} % does not raise it (already {last_throttle} %)")
            last_throttle = step.value
        elif step.action == "postcopy" and not p.postcopy:
            raise PolicyError(f"{at}: postcopy step but postcopy = false for this policy")


def _steps(*steps: tuple) -> tuple[StallStep, ...]:
    return tuple(StallStep(*s) for s in steps)


BUILTIN_POLICIES: dict[str, ConvergencePolicy] = {
    p.name: p for p in (
        ConvergencePolicy(
            name="balanced",
            description="pre-copy while it converges within 0.8 of the completion timeout; post-copy after "
                        "the first pass when the guest dirties memory at 0.7 of the bandwidth or more; "
                        "downtime raised to 100 ms at most, then throttle, then post-copy",
            downtime_limit_ms=10, blackout_budget_ms=100, postcopy=True, strategy="auto",
            postcopy_dirty_ratio=0.7,
            schedule=_steps((1, "raise-downtime", 30), (2, "raise-downtime", 100), (3, "throttle", 50),
                            (4, "postcopy")),
            final_action="postcopy", completion_timeout_per_gib_s=30, completion_timeout_min_s=10,
            no_progress_timeout_s=20,
        ),
        ConvergencePolicy(
            name="min-blackout",
            description="shortest pause: post-copy after the first pass unless the guest is nearly idle; "
                        "downtime never above 20 ms",
            downtime_limit_ms=5, blackout_budget_ms=20, postcopy=True, strategy="auto",
            postcopy_dirty_ratio=0.1,
            schedule=_steps((1, "raise-downtime", 20), (2, "postcopy")),
            final_action="postcopy", completion_timeout_per_gib_s=30, completion_timeout_min_s=10,
            no_progress_timeout_s=15,
        ),
        ConvergencePolicy(
            name="no-postcopy",
            description="pre-copy only (a VM that must never depend on two hosts at once): raise the "
                        "downtime to 100 ms, throttle the guest, abort at the timeouts and retry later",
            downtime_limit_ms=10, blackout_budget_ms=100, postcopy=False, strategy="precopy",
            schedule=_steps((1, "raise-downtime", 30), (2, "raise-downtime", 100), (3, "throttle", 50),
                            (4, "throttle", 80), (5, "throttle", 99)),
            final_action="abort", completion_timeout_per_gib_s=30, completion_timeout_min_s=10,
            no_progress_timeout_s=20,
        ),
    )
}
DEFAULT_POLICY = "balanced"

_POLICY_KEYS = {f for f in ConvergencePolicy.__dataclass_fields__ if f != "name"}
_INT_KEYS = {"downtime_limit_ms", "blackout_budget_ms", "max_bandwidth_mib_s", "xbzrle_cache_mib",
             "multifd_channels"}


def policy_from_dict(name: str, d: Mapping, where: str = "") -> ConvergencePolicy:
    """Build and validate one policy from a TOML table (or any mapping); unknown keys are refused."""
    prefix = f"{where}: " if where else ""
    if not isinstance(d, Mapping):
        raise PolicyError(f"{prefix}policy {name!r} must be a table")
    unknown = sorted(set(d) - _POLICY_KEYS)
    if unknown:
        raise PolicyError(f"{prefix}policy {name!r}: unknown key {unknown[0]!r} "
                          f"(known: {', '.join(sorted(_POLICY_KEYS))})")
    kw: dict[str, Any] = {k: v for k, v in d.items() if k != "schedule"}
    for k in _INT_KEYS & set(kw):
        if isinstance(kw[k], float) and kw[k].is_integer():
            kw[k] = int(kw[k])
        if isinstance(kw[k], bool) or not isinstance(kw[k], int):
            raise PolicyError(f"{prefix}policy {name!r}: {k} must be a whole number, got {kw[k]!r}")
    raw_steps = d.get("schedule", [])
    if not isinstance(raw_steps, list):
        raise PolicyError(f"{prefix}policy {name!r}: schedule must be a list of steps")
    steps = []
    for i, raw in enumerate(raw_steps, 1):
        at = f"{prefix}policy {name!r}: schedule step {i}"
        if not isinstance(raw, Mapping):
            raise PolicyError(f"{at}: must be a table like {{after = 2, action = \"postcopy\"}}")
        action = raw.get("action")
        if action not in STEP_ACTIONS:
            raise PolicyError(f"{at}: unknown action {action!r} (known: {', '.join(STEP_ACTIONS)})")
        allowed = {"after", "action"} | ({_STEP_VALUE_KEY[action]} if action in _STEP_VALUE_KEY else set())
        extra = sorted(set(raw) - allowed)
        if extra:
            raise PolicyError(f"{at}: unknown key {extra[0]!r} for action {action!r}")
        if "after" not in raw:
            raise PolicyError(f"{at}: missing 'after' (iterations without progress)")
        value = None
        if action in _STEP_VALUE_KEY:
            key = _STEP_VALUE_KEY[action]
            if key not in raw:
                raise PolicyError(f"{at}: {action} needs {key}")
            value = raw[key]
        steps.append(StallStep(after=raw["after"], action=action, value=value))
    try:
        return ConvergencePolicy(name=name, schedule=tuple(steps), **kw)
    except PolicyError as exc:
        raise PolicyError(f"{prefix}{exc}") from None
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise PolicyError(f"{prefix}policy {name!r}: {exc}") from None


def load_policies(path: str | Path, include_builtin: bool = True) -> dict[str, ConvergencePolicy]:
    """Policies from a TOML file (`[policy.<name>]` tables), on top of the built-in ones.

    A file policy with a built-in name replaces it. Any error refuses the whole file.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    return policies_from_toml_data(data, str(path), include_builtin)


def policies_from_toml_data(data: Mapping, where: str = "<policies>",
                            include_builtin: bool = True) -> dict[str, ConvergencePolicy]:
    extra = sorted(set(data) - {"policy"})
    if extra:
        raise PolicyError(f"{where}: unknown top-level key {extra[0]!r} (policies go in [policy.<name>] tables)")
    tables = data.get("policy", {})
    if not isinstance(tables, Mapping) or not tables:
        raise PolicyError(f"{where}: no [policy.<name>] tables")
    out = dict(BUILTIN_POLICIES) if include_builtin else {}
    for name, table in tables.items():
        out[name] = policy_from_dict(name, table, where)
    return out


def unsafe_options(policy: ConvergencePolicy, accel: str) -> list[str]:
    """Reasons not to run `policy` on hosts with this accelerator ("tcg" | "kvm"); empty if fine.

    Measured, not theoretical: under TCG (QEMU 7.2) 1 of 5 XBZRLE pre-copy migrations in
    the convergence benchmark left 3 guest pages different on the target and the guest
    kernel hit a general protection fault; none of ~60 checked migrations without it did.
    The migrator should refuse such a policy (or drop the option) on TCG hosts."""
    reasons = []
    if accel == "tcg" and policy.xbzrle:
        reasons.append(f"policy {policy.name!r} uses XBZRLE, which corrupted guest memory under TCG "
                       "(QEMU 7.2) in ferry's convergence benchmark")
    return reasons


def select_policy(policies: Mapping[str, ConvergencePolicy], vm: str | None = None,
                  event: str | None = None, default: str = DEFAULT_POLICY) -> tuple[ConvergencePolicy, str]:
    """The policy for one migration and why: the VM's own choice wins (it is the owner's
    contract, e.g. no-postcopy), then the maintenance event's, then the default."""
    for source, name in (("vm", vm), ("maintenance event", event), ("default", default)):
        if name:
            if name not in policies:
                raise PolicyError(f"unknown convergence policy {name!r} (from the {source}; "
                                  f"known: {', '.join(sorted(policies))})")
            return policies[name], f"policy {name!r} from the {source}"
    raise PolicyError("no convergence policy selected and no default")


# ---- prediction --------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """The pre-copy model's forecast, kept beside the outcome on the migration."""

    memory_bytes: int
    dirty_rate_bytes_s: float
    bandwidth_bytes_s: float
    downtime_limit_ms: float
    dirty_ratio: float              # dirty rate / bandwidth
    converges: bool                 # pre-copy reaches the downtime limit
    iterations: int                 # passes over memory, the first full pass included
    first_pass_s: float
    precopy_s: float | None         # migrate -> stop-and-copy (None: does not converge)
    precopy_blackout_ms: float | None   # expected pre-copy blackout (None: does not converge)
    blackout_ms: float | None       # expected blackout of the chosen strategy (None: unknown)
    bytes_sent: int                 # expected bytes on the wire (chosen strategy)
    postcopy_s: float               # migrate -> end, if post-copy starts after the first pass
    strategy: str                   # precopy | postcopy-after-first-pass | precopy-escalate
    reason: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dirty_rate_mib_s"] = round(self.dirty_rate_bytes_s / MIB, 1)
        d["bandwidth_mib_s"] = round(self.bandwidth_bytes_s / MIB, 1)
        return d


def predict(memory_bytes: int, dirty_rate_bytes_s: float, bandwidth_bytes_s: float,
            downtime_limit_ms: float, *, postcopy_allowed: bool = True, postcopy_dirty_ratio: float = 0.5,
            max_precopy_s: float | None = None, overhead_ms: float = 5.0,
            max_iterations: int = 30) -> Prediction:
    """Forecast pre-copy from the dirty rate and the bandwidth, and choose a strategy.

    Model: the first pass sends all of memory (M/B seconds); each later pass sends
    what the guest dirtied during the previous one, D*t (at most M). Pre-copy
    converges once a pass fits in the downtime limit (x/B <= limit): the expected
    blackout is then that last pass plus a fixed `overhead_ms` (device state,
    stopping and starting vCPUs). D is the rate measured over ~1 s
    (calc-dirty-rate), which saturates at working-set/1 s; for t > 1 s the model
    over-counts a small working set, which only matters when WS/B already exceeds
    the limit, i.e. when pre-copy cannot converge anyway.

    Strategy: `precopy` when it converges, D/B < postcopy_dirty_ratio and it takes
    at most max_precopy_s (or post-copy is not allowed and it converges); else
    `postcopy-after-first-pass` when allowed; else `precopy-escalate` (run the stall
    schedule and the timeouts).
    """
    if memory_bytes <= 0:
        raise ValueError("memory_bytes must be > 0")
    if bandwidth_bytes_s <= 0:
        raise ValueError("bandwidth_bytes_s must be > 0")
    if downtime_limit_ms <= 0:
        raise ValueError("downtime_limit_ms must be > 0")
    M, D, B = float(memory_bytes), max(0.0, float(dirty_rate_bytes_s)), float(bandwidth_bytes_s)
    limit_s = downtime_limit_ms / 1000.0
    ratio = D / B
    first_pass_s = M / B

    x, t_total, sent, iterations, converges = M, 0.0, 0.0, 0, False
    final_x = M
    while iterations < max_iterations:
        if iterations > 0 and x / B <= limit_s:
            converges, final_x = True, x
            break
        t = x / B
        t_total += t
        sent += x
        iterations += 1
        nxt = min(M, D * t)
        if iterations > 1 and nxt >= x:   # a pass no smaller than the last: never converges
            break
        x = nxt
    else:
        if x / B <= limit_s:
            converges, final_x = True, x
    precopy_blackout_ms = final_x / B * 1000 + overhead_ms if converges else None

    # post-copy after the first pass: the pages dirtied during it move after the switch
    dirty_after_first = min(M, D * first_pass_s)
    postcopy_s = first_pass_s + dirty_after_first / B
    postcopy_blackout_ms = overhead_ms

    fast_enough = max_precopy_s is None or t_total <= max_precopy_s
    if converges and ((ratio < postcopy_dirty_ratio and fast_enough) or not postcopy_allowed):
        strategy = "precopy"
        why = (f"pre-copy converges: dirty {D / MIB:.0f} MiB/s is {ratio:.2f} of the bandwidth "
               f"{B / MIB:.0f} MiB/s; {iterations} passes, ~{t_total:.1f} s, blackout ~{precopy_blackout_ms:.0f} ms")
        return Prediction(memory_bytes, D, B, downtime_limit_ms, ratio, True, iterations, first_pass_s,
                          t_total, precopy_blackout_ms, precopy_blackout_ms, int(sent + final_x), postcopy_s,
                          strategy, why)
    if postcopy_allowed:
        strategy = "postcopy-after-first-pass"
        if converges:
            why = (f"dirty {D / MIB:.0f} MiB/s is {ratio:.2f} of the bandwidth {B / MIB:.0f} MiB/s "
                   f"({'>= ' + str(postcopy_dirty_ratio) if ratio >= postcopy_dirty_ratio else 'slow'}): pre-copy "
                   f"would need {iterations} passes (~{t_total:.1f} s"
                   f"{'' if fast_enough else f', over {max_precopy_s:.0f} s'}); "
                   f"post-copy after the first pass takes ~{postcopy_s:.1f} s")
        else:
            why = (f"pre-copy does not converge: dirty {D / MIB:.0f} MiB/s vs bandwidth {B / MIB:.0f} MiB/s "
                   f"at a {downtime_limit_ms:.0f} ms limit; post-copy after the first pass (~{postcopy_s:.1f} s)")
        return Prediction(memory_bytes, D, B, downtime_limit_ms, ratio, converges, iterations, first_pass_s,
                          t_total if converges else None, precopy_blackout_ms, postcopy_blackout_ms,
                          int(M + dirty_after_first), postcopy_s, strategy, why)
    strategy = "precopy-escalate"
    why = (f"pre-copy does not converge (dirty {D / MIB:.0f} MiB/s vs bandwidth {B / MIB:.0f} MiB/s at "
           f"{downtime_limit_ms:.0f} ms) and post-copy is not allowed: escalate by the schedule, then the "
           "final action")
    return Prediction(memory_bytes, D, B, downtime_limit_ms, ratio, converges, iterations, first_pass_s,
                      None, None, None, int(sent), postcopy_s, strategy, why)


def plan(policy: ConvergencePolicy, memory_bytes: int, dirty_rate_bytes_s: float,
         bandwidth_bytes_s: float, overhead_ms: float = 5.0) -> Prediction:
    """`predict` with the policy's settings (pre-copy must fit in 0.8 of the completion
    timeout to be chosen); a forced strategy overrides the model's choice."""
    pred = predict(memory_bytes, dirty_rate_bytes_s, bandwidth_bytes_s, policy.downtime_limit_ms,
                   postcopy_allowed=policy.postcopy, postcopy_dirty_ratio=policy.postcopy_dirty_ratio,
                   max_precopy_s=0.8 * policy.completion_timeout_s(memory_bytes), overhead_ms=overhead_ms)
    if policy.strategy == "postcopy" and pred.strategy != "postcopy-after-first-pass":
        return replace(pred, strategy="postcopy-after-first-pass", blackout_ms=overhead_ms,
                       bytes_sent=int(pred.memory_bytes + min(pred.memory_bytes,
                                                              pred.dirty_rate_bytes_s * pred.first_pass_s)),
                       reason=f"policy {policy.name!r} always switches to post-copy after the first pass; "
                              + pred.reason)
    if policy.strategy == "precopy" and pred.strategy == "postcopy-after-first-pass":
        strategy = "precopy" if pred.converges else "precopy-escalate"
        return replace(pred, strategy=strategy, blackout_ms=pred.precopy_blackout_ms,
                       reason=f"policy {policy.name!r} starts in pre-copy and escalates by its schedule; "
                              + pred.reason)
    return pred


# ---- the monitor loop's decisions ----------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """The fields of one `query-migrate` reading that decisions use (see MigrationSample)."""

    status: str
    remaining: int = 0
    transferred: int = 0
    total: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    page_size: int = 4096
    total_time_ms: int | None = None
    expected_downtime_ms: int | None = None
    error: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> "Sample":
        """From `MigrationSample.to_dict()` (what agents report)."""
        return cls(status=d.get("status", "none"), remaining=int(d.get("remaining") or 0),
                   transferred=int(d.get("transferred") or 0), total=int(d.get("total") or 0),
                   dirty_sync_count=int(d.get("dirty_sync_count") or 0),
                   dirty_pages_rate=int(d.get("dirty_pages_rate") or 0),
                   page_size=int(d.get("page_size") or 4096), total_time_ms=d.get("total_time_ms"),
                   expected_downtime_ms=d.get("expected_downtime_ms"), error=d.get("error"))


@dataclass(frozen=True)
class MonitorState:
    """What the monitor loop carries between samples; `decisions` is the migration's log."""

    policy: str
    started_at: float
    memory_bytes: int
    strategy: str
    prediction: dict                # before `migrate`
    reprediction: dict | None = None    # at the end of the first pass, with observed numbers
    phase: str = "precopy"          # precopy | postcopy-requested | postcopy | aborting | done
    downtime_ms: int = 0
    throttle_pct: int = 0
    next_step: int = 0              # index of the next schedule step
    last_sync: int = 0
    last_transferred: int = 0
    best_remaining: int | None = None   # first pass: lowest `remaining`
    best_dirty: int | None = None       # later passes: lowest dirty-set estimate
    progress_at: float = 0.0
    stalled: int = 0                    # iterations without progress
    first_pass_at: float | None = None
    requested_at: float | None = None   # when post-copy or abort was requested
    outcome: str | None = None          # completed | failed | cancelled (QEMU's final status)
    final_reason: str | None = None
    decisions: tuple[Decision, ...] = ()

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def decision_log(self) -> list[dict]:
        return [d.to_dict() for d in self.decisions]


def start(policy: ConvergencePolicy, prediction: Prediction, memory_bytes: int, now: float) -> MonitorState:
    """The state before the first sample; its log opens with the prediction and strategy."""
    note = Decision(0.0, "note", f"{policy.name}: strategy {prediction.strategy}: {prediction.reason}",
                    {"prediction": prediction.to_dict(),
                     "completion_timeout_s": round(policy.completion_timeout_s(memory_bytes), 1),
                     "no_progress_timeout_s": policy.no_progress_timeout_s})
    return MonitorState(policy=policy.name, started_at=now, memory_bytes=memory_bytes,
                        strategy=prediction.strategy, prediction=prediction.to_dict(),
                        downtime_ms=policy.downtime_limit_ms, progress_at=now, decisions=(note,))


def _log(state: MonitorState, now: float, kind: str, reason: str, sample: Sample, params: dict | None = None
         ) -> MonitorState:
    d = Decision(round(now - state.started_at, 3), kind, reason, dict(params or {}), sample.status,
                 sample.dirty_sync_count)
    return replace(state, decisions=state.decisions + (d,))


def _act(state: MonitorState, now: float, sample: Sample, actions: list[Action], action: Action) -> MonitorState:
    actions.append(action)
    return _log(state, now, action.kind.value, action.reason, sample, action.params)


def _final_action(policy: ConvergencePolicy, state: MonitorState, sample: Sample, now: float,
                  actions: list[Action], why: str) -> MonitorState:
    if policy.final_action == "postcopy" and policy.postcopy and sample.status == "active":
        state = _act(state, now, sample, actions,
                     Action(ActionKind.POSTCOPY, {}, f"{why}; final action: switch to post-copy"))
        return replace(state, phase="postcopy-requested", requested_at=now, final_reason=why)
    state = _act(state, now, sample, actions,
                 Action(ActionKind.ABORT, {"retry_after_s": policy.retry_after_s},
                        f"{why}; final action: abort, roll back and retry in {policy.retry_after_s:.0f} s"))
    return replace(state, phase="aborting", requested_at=now, final_reason=why)


def _mib(b: float | None) -> str:
    return "?" if b is None else f"{b / MIB:.0f} MiB"


def _repredict(policy: ConvergencePolicy, state: MonitorState, sample: Sample, now: float,
               dirty_set: int) -> MonitorState:
    """At the end of the first pass the real throughput is known: predict again with it.

    Bandwidth = bytes sent / QEMU's total time so far. Dirty rate = QEMU's own rate
    over the first pass (pages found dirty at the sync / pass time; else the dirty-set
    estimate / pass time): what the guest manages *while* being migrated, which under
    TCG is far below what it does undisturbed (calc-dirty-rate before `migrate`)."""
    if policy.strategy != "auto" or not sample.total_time_ms or sample.transferred <= 0:
        return state
    t0 = sample.total_time_ms / 1000.0
    observed_bw = sample.transferred / t0
    in_migration = sample.dirty_pages_rate * sample.page_size or dirty_set / t0
    pred = plan(policy, state.memory_bytes, in_migration, observed_bw)
    params = {"prediction": pred.to_dict(), "observed_bandwidth_bytes_s": round(observed_bw),
              "dirty_rate_during_first_pass_bytes_s": round(in_migration)}
    what = (f"re-predicted with what the first pass showed: {observed_bw / MIB:.0f} MiB/s sent, guest dirtied "
            f"{in_migration / MIB:.0f} MiB/s meanwhile (measured before: "
            f"{float(state.prediction.get('dirty_rate_bytes_s') or 0) / MIB:.0f} MiB/s)")
    state = replace(state, reprediction=pred.to_dict())
    if pred.strategy == state.strategy:
        return _log(state, now, "note", f"{what}: strategy stays {state.strategy}", sample, params)
    state = _log(state, now, "note", f"{what}: strategy {state.strategy} -> {pred.strategy}: {pred.reason}",
                 sample, params)
    return replace(state, strategy=pred.strategy)


def decide(policy: ConvergencePolicy, state: MonitorState, sample: Sample | Mapping, now: float
           ) -> tuple[list[Action], MonitorState]:
    """One step of the monitor loop: the actions to apply now (in order) and the new state.

    Call it on every `query-migrate` sample of the source (every policy.sample_interval_s).
    It never returns an action twice for the same reason, never acts after QEMU reached a
    final status, and after post-copy started it only watches (post-copy cannot be undone).
    """
    if not isinstance(sample, Sample):
        sample = Sample.from_dict(sample)
    actions: list[Action] = []
    if state.done:
        return actions, state
    elapsed = now - state.started_at
    st = sample.status

    if st in FINAL_STATUSES:
        why = {"completed": "QEMU reports the migration completed",
               "failed": f"QEMU reports the migration failed: {sample.error or 'no detail'}",
               "cancelled": "QEMU reports the migration cancelled"}[st]
        state = _log(state, now, "note", why, sample)
        return actions, replace(state, phase="done", outcome=st)

    if st in POSTCOPY_STATUSES:
        if state.phase != "postcopy":
            state = _log(state, now, "note", "post-copy active: the VM runs on the target; it cannot be "
                         "rolled back, so the timeouts no longer apply", sample)
            state = replace(state, phase="postcopy")
        return actions, state

    if state.phase in ("aborting", "postcopy"):
        # An abort was sent, or post-copy began: neither can be undone, so nothing more to decide.
        return actions, state
    if state.phase == "postcopy-requested":
        if state.requested_at is not None and now - state.requested_at > policy.postcopy_switch_timeout_s:
            state = _act(state, now, sample, actions,
                         Action(ActionKind.ABORT, {"retry_after_s": policy.retry_after_s},
                                f"post-copy was requested {now - state.requested_at:.1f} s ago but QEMU did "
                                "not switch; abort and roll back"))
            state = replace(state, phase="aborting", requested_at=now)
        return actions, state

    # ---- progress accounting ----------------------------------------------------------
    sync = sample.dirty_sync_count
    new_iterations = max(0, sync - state.last_sync)
    sent_since = max(0, sample.transferred - state.last_transferred)
    state = replace(state, last_sync=max(sync, state.last_sync), last_transferred=sample.transferred)
    if st == "active" and sync < 2:
        # first pass: progress = a new low of what is left to send
        if state.best_remaining is None or sample.remaining < state.best_remaining:
            state = replace(state, best_remaining=sample.remaining, progress_at=now)
    elif st == "active" and new_iterations:
        estimate = sample.remaining + sent_since // 2
        if state.first_pass_at is None:
            state = replace(state, first_pass_at=now, best_dirty=estimate, progress_at=now, stalled=0)
            state = _log(state, now, "note", f"first pass done after {elapsed:.1f} s ({_mib(sample.transferred)} "
                         f"sent); dirty set ~{_mib(estimate)}", sample, {"dirty_set_bytes": estimate})
            state = _repredict(policy, state, sample, now, estimate)
            if state.strategy == "postcopy-after-first-pass" and policy.postcopy:
                basis = state.reprediction or state.prediction
                state = _act(state, now, sample, actions,
                             Action(ActionKind.POSTCOPY, {},
                                    f"strategy post-copy after the first pass: {basis.get('reason', '')}"))
                return actions, replace(state, phase="postcopy-requested", requested_at=now)
        elif state.best_dirty is None or estimate < state.best_dirty * (1 - policy.progress_margin):
            state = replace(state, best_dirty=estimate, progress_at=now, stalled=0)
        else:
            state = replace(state, stalled=state.stalled + new_iterations)

    # ---- timeouts (end in the final action) --------------------------------------------
    limit = policy.completion_timeout_s(state.memory_bytes)
    if elapsed > limit:
        return actions, _final_action(
            policy, state, sample, now, actions,
            f"not completed within {limit:.0f} s ({policy.completion_timeout_per_gib_s:.0f} s/GiB x "
            f"{state.memory_bytes / GIB:.2f} GiB, at least {policy.completion_timeout_min_s:.0f} s)")
    if now - state.progress_at > policy.no_progress_timeout_s:
        return actions, _final_action(
            policy, state, sample, now, actions,
            f"no progress for {now - state.progress_at:.0f} s (limit {policy.no_progress_timeout_s:.0f} s; "
            f"dirty set stays ~{_mib(state.best_dirty)})")

    # ---- the stall schedule -------------------------------------------------------------
    if state.next_step < len(policy.schedule) and st == "active":
        step = policy.schedule[state.next_step]
        if state.stalled >= step.after:
            why = (f"{state.stalled} iterations without progress (dirty set ~{_mib(state.best_dirty)} or more, "
                   f"{_mib(sample.remaining)} left)")
            state = replace(state, next_step=state.next_step + 1)
            if step.action == "raise-downtime":
                state = _act(state, now, sample, actions,
                             Action(ActionKind.SET_DOWNTIME, {"downtime_limit_ms": step.value},
                                    f"{why}: raise the downtime limit {state.downtime_ms} -> {step.value} ms"))
                state = replace(state, downtime_ms=step.value)
            elif step.action == "throttle":
                state = _act(state, now, sample, actions,
                             Action(ActionKind.THROTTLE, {"percent": step.value},
                                    f"{why}: throttle the guest's vCPUs to {step.value} % (auto-converge)"))
                state = replace(state, throttle_pct=step.value)
            elif step.action == "postcopy":
                state = _act(state, now, sample, actions,
                             Action(ActionKind.POSTCOPY, {}, f"{why}: switch to post-copy"))
                state = replace(state, phase="postcopy-requested", requested_at=now)
            else:
                state = _act(state, now, sample, actions,
                             Action(ActionKind.ABORT, {"retry_after_s": policy.retry_after_s},
                                    f"{why}: abort, roll back and retry in {policy.retry_after_s:.0f} s"))
                state = replace(state, phase="aborting", requested_at=now, final_reason=why)
    return actions, state


def hard_stop(policy: ConvergencePolicy, state: MonitorState, sample: Sample | Mapping, now: float,
              why: str, abort: bool = False) -> tuple[list[Action], MonitorState]:
    """An outside deadline (a maintenance window closing): the policy's final action now;
    with abort=True (an operator's cancel, a benchmark's time limit) always abort.
    Nothing to do once post-copy runs or QEMU reached a final status."""
    if not isinstance(sample, Sample):
        sample = Sample.from_dict(sample)
    actions: list[Action] = []
    if state.phase in ("done", "aborting", "postcopy", "postcopy-requested") or sample.status in FINAL_STATUSES \
            or sample.status in POSTCOPY_STATUSES:
        return actions, state
    if abort:
        state = _act(state, now, sample, actions,
                     Action(ActionKind.ABORT, {"retry_after_s": policy.retry_after_s}, f"{why}; abort and roll back"))
        return actions, replace(state, phase="aborting", requested_at=now, final_reason=why)
    return actions, _final_action(policy, state, sample, now, actions, why)

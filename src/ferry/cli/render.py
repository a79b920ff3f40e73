"""Rich renderings of hosts, VMs and migrations (pure: data in, renderables out)."""
from __future__ import annotations

import datetime as dt

from rich.table import Table


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024 / 1024:,.1f} MiB"


def clock(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def hosts_table(hosts: list[dict]) -> Table:
    t = Table(title="hosts")
    for col in ("name", "state", "VMs", "memory used/total", "vCPUs", "labels", "underlay"):
        t.add_column(col)
    for h in hosts:
        t.add_row(h["name"], h["state"], str(h.get("vm_count", "")),
                  f"{h['used_memory_mib']}/{h['memory_mib']} MiB", str(h["vcpus"]),
                  ",".join(f"{k}={v}" for k, v in h.get("labels", {}).items()), h["underlay_ip"])
    return t


def vms_table(vms: list[dict]) -> Table:
    t = Table(title="VMs")
    for col in ("name", "host", "state", "IP", "memory", "vCPUs", "workload", "moves"):
        t.add_column(col)
    for v in vms:
        t.add_row(v["name"], v["host"] or "-", v["state"], v["ip"], f"{v['spec']['memory_mib']} MiB",
                  str(v["spec"]["vcpus"]), v["spec"]["workload"], str(v.get("migrations", 0)))
    return t


def migrations_table(ms: list[dict]) -> Table:
    t = Table(title="migrations")
    for col in ("id", "vm", "source", "target", "phase", "blackout", "total", "started"):
        t.add_column(col)
    for m in ms:
        s = m["stats"]
        t.add_row(m["id"], m["vm"], m["source"], m["target"], m["phase"],
                  "-" if s.get("blackout_ms") is None else f"{s['blackout_ms']:.1f} ms",
                  "-" if s.get("total_s") is None else f"{s['total_s']:.2f} s", clock(m["created_at"]))
    return t


def timeline_table(m: dict) -> Table:
    t = Table(title=f"migration {m['id']}: {m['vm']} {m['source']} -> {m['target']} ({m['phase']})")
    for col in ("phase", "entered at", "+ms since start", "lasted"):
        t.add_column(col, justify="right" if col != "phase" else "left")
    timeline = m["timeline"]
    start = timeline[0][1] if timeline else 0
    for i, (phase, at) in enumerate(timeline):
        nxt = timeline[i + 1][1] if i + 1 < len(timeline) else None
        lasted = "-" if nxt is None else f"{(nxt - at) * 1000:,.1f} ms"
        t.add_row(phase, clock(at), f"{(at - start) * 1000:,.1f}", lasted)
    return t


STAT_LABELS = [
    ("precopy_s", "pre-migration brownout (precopy)", "s"),
    ("blackout_ms", "blackout (source STOP -> target RESUME)", "ms"),
    ("qemu_downtime_ms", "QEMU-reported downtime", "ms"),
    ("verify_ms", "memory verification (inside blackout)", "ms"),
    ("postmigration_s", "post-migration brownout", "s"),
    ("total_s", "total", "s"),
    ("bytes_transferred", "bytes transferred", "bytes"),
    ("ram_total_bytes", "guest RAM", "bytes"),
    ("dirty_sync_count", "dirty-sync iterations", ""),
    ("max_dirty_rate_mib_s", "highest dirty rate seen", "MiB/s"),
    ("mbps", "throughput", "Mbit/s"),
    ("setup_ms", "setup", "ms"),
    ("postcopy_s", "post-copy (switch -> completed)", "s"),
    ("postcopy_blocktime_ms", "post-copy block time (vCPUs waiting for pages)", "ms"),
    ("dirty_rate_measured_mib_s", "dirty rate measured before (calc-dirty-rate)", "MiB/s"),
    ("fabric_update_s", "fabric caught up after", "s"),
    ("forwarded_packets", "packets forwarded by the source", ""),
    ("pages_compared", "pages compared", ""),
    ("pages_different", "pages different", ""),
]


def stats_table(m: dict) -> Table:
    t = Table(title="statistics")
    t.add_column("measure")
    t.add_column("value", justify="right")
    s = m["stats"]
    for key, label, unit in STAT_LABELS:
        v = s.get(key)
        if v is None:
            continue
        text = mib(v) if unit == "bytes" else f"{v:,.3f} {unit}".strip() if isinstance(v, float) else f"{v:,} {unit}".strip()
        t.add_row(label, text)
    return t


def events_table(events: list[dict]) -> Table:
    t = Table(title="maintenance events")
    for col in ("id", "source", "urgency", "state", "hosts", "reason", "created", "finished"):
        t.add_column(col)
    for e in events:
        hosts = " ".join(f"{h}:{e['progress'].get(h, '?')}" for h in e["hosts"])
        t.add_row(e["id"], e["source"], e["urgency"], e["state"], hosts, e["reason"][:60],
                  clock(e["created_at"]), clock(e.get("finished_at")))
    return t


def event_log(e: dict) -> Table:
    t = Table(title=f"event {e['id']} log")
    t.add_column("at")
    t.add_column("what")
    for at, text in e.get("log", []):
        t.add_row(clock(at), text)
    return t


def prediction_table(m: dict) -> Table:
    """The forecast made before the migration beside what happened."""
    p, s = m.get("prediction") or {}, m["stats"]
    t = Table(title=f"prediction vs outcome (policy {m.get('policy')}: {p.get('strategy', '-')})")
    for col in ("measure", "predicted", "measured"):
        t.add_column(col, justify="right" if col != "measure" else "left")

    def fmt(v, unit=""):
        return "-" if v is None else (f"{v:,.1f} {unit}".strip() if isinstance(v, float) else f"{v:,} {unit}".strip())
    t.add_row("dirty rate", fmt(p.get("dirty_rate_mib_s"), "MiB/s"), fmt(s.get("max_dirty_rate_mib_s"), "MiB/s (max during)"))
    t.add_row("bandwidth", fmt(p.get("bandwidth_mib_s"), "MiB/s"),
              fmt(s.get("mbps") / 8 * 1e6 / 2**20 if s.get("mbps") else None, "MiB/s"))
    t.add_row("pre-copy", fmt(p.get("precopy_s") if p.get("strategy") == "precopy" else p.get("first_pass_s"), "s"),
              fmt(s.get("precopy_s"), "s"))
    t.add_row("blackout", fmt(p.get("blackout_ms"), "ms"), fmt(s.get("blackout_ms"), "ms"))
    t.add_row("bytes sent", mib(p.get("bytes_sent")), mib(s.get("bytes_transferred")))
    return t


def decisions_table(m: dict) -> Table:
    t = Table(title="convergence decisions")
    for col in ("+s", "iteration", "status", "decision", "reason"):
        t.add_column(col)
    for d in m.get("decisions") or []:
        t.add_row(f"{d['elapsed_s']:.2f}", str(d.get("iteration", "")), d.get("status", ""), d["kind"], d["reason"])
    return t

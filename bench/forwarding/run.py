"""What clients see during post-migration brownout, with and without source forwarding.

    python -m bench.forwarding.run [--fabric-delay 2]

Two labs whose fabric moves a VM's route only after a propagation delay; the
same guest (512 MiB, memload 50 MiB/s) is migrated while the traffic probe
holds an echo connection (a line every 10 ms) and sends short HTTP requests.
"""
from __future__ import annotations

import argparse
import time

from bench.common import bench_lab, down, follow, machine, write
from ferry.lab.traffic import collect, run_probe_in_client, wait_ready


def one(prefix: str, port: int, forwarding: bool, delay: float) -> dict:
    import os
    os.environ["FERRY_LAB_FABRIC_DELAY_S"] = str(delay)
    cfg, api = bench_lab(prefix, port, host_memory=1024, migration="" if forwarding else "forwarding = false\n")
    try:
        vm = api.post("/v1/vms", {"name": "echo-1", "memory_mib": 512, "vcpus": 1, "workload": "memload:rate=50",
                                  "host": "host-1"})
        time.sleep(5)
        probe = run_probe_in_client(cfg.prefix, vm["ip"], delay + 7, timeline=True)
        if not wait_ready(probe):
            raise RuntimeError("probe could not reach the guest")
        time.sleep(1)
        m = follow(api, api.post("/v1/migrations", {"vm": "echo-1", "target": "host-2"}))
        report = collect(probe)
    finally:
        down(cfg, log=lambda m: None)
    s = m["stats"]
    offset = time.time() - time.monotonic()     # the probe's times are monotonic, the migration's wall clock
    return {"forwarding": forwarding, "phase": m["phase"], "blackout_ms": s["blackout_ms"],
            "fabric_update_s": s["fabric_update_s"], "postmigration_s": s["postmigration_s"],
            "forwarded_packets": s["forwarded_packets"],
            "echo_longest_gap_ms": report["echo"]["longest_gap_ms"], "echo_survived": report["echo"]["survived"],
            "http_ok": report["http"]["ok"], "http_failed": report["http"]["failed"],
            "http_longest_gap_ms": report["http"]["longest_gap_ms"], "http_errors": report["http"].get("errors"),
            "timeline": [[p, round(t, 3)] for p, t in m["timeline"]],
            "http_failed_started": [round(t + offset, 3) for t in report.get("timeline", {}).get("http_failed_started", [])]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fabric-delay", type=float, default=2.0)
    args = ap.parse_args()
    arms = [one("fbfwd", 18796, True, args.fabric_delay), one("fbnofwd", 18797, False, args.fabric_delay)]
    ratio = round(arms[1]["echo_longest_gap_ms"] / max(arms[0]["echo_longest_gap_ms"], 1e-3), 1)
    md = [f"# Post-migration brownout: source forwarding vs none (fabric delay {args.fabric_delay} s)", "",
          "| arm | blackout ms | echo longest gap ms | echo survived | HTTP ok/failed | HTTP longest gap ms | fabric moved after s | forwarded packets |",
          "|---|---|---|---|---|---|---|---|"]
    for a in arms:
        md.append(f"| {'forwarding' if a['forwarding'] else 'no forwarding'} | {a['blackout_ms']} | {a['echo_longest_gap_ms']} |"
                  f" {a['echo_survived']} | {a['http_ok']}/{a['http_failed']} | {a['http_longest_gap_ms']} |"
                  f" {a['fabric_update_s']} | {a['forwarded_packets']} |")
    md += ["", f"Longest gap a client saw, without / with forwarding: **{ratio}x**", ""]
    out = write("forwarding", {"fabric_delay_s": args.fabric_delay, "machine": machine(), "arms": arms,
                               "gap_ratio_without_over_with": ratio}, "\n".join(md))
    print("\n".join(md))
    print(f"written to {out}")


if __name__ == "__main__":
    main()

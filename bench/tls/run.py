"""TLS vs plain migration of a 1 GiB guest, side by side in one run.

    python -m bench.tls.run [--rounds 3]

One lab, one 1 GiB guest rewriting 50 MiB/s; it is migrated back and forth,
alternating a TLS stream (fleet certificates, tls-authz) and a plain TCP one,
so both arms see the same guest, link and machine load.
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench.common import bench_lab, down, follow, machine, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg, api = bench_lab("fbtls", 18795, host_memory=3072)
    runs: list[dict] = []
    try:
        api.post("/v1/vms", {"name": "big-1", "memory_mib": 1024, "vcpus": 1, "workload": "memload:rate=50,size=768"})
        time.sleep(15)     # memload fills its 768 MiB before the first move
        for i in range(args.rounds):
            for tls in (True, False):
                vm = api.get("/v1/vms/big-1")
                target = "host-2" if vm["host"] == "host-1" else "host-1"
                m = follow(api, api.post("/v1/migrations", {"vm": "big-1", "target": target, "tls": tls}))
                s = m["stats"]
                runs.append({"round": i, "tls": tls, "phase": m["phase"], "total_s": s["total_s"],
                             "precopy_s": s["precopy_s"], "blackout_ms": s["blackout_ms"],
                             "bytes": s["bytes_transferred"], "mbps": s["mbps"]})
                print(runs[-1], flush=True)
                time.sleep(2)
        errors = api.get("/v1/vms/big-1")["guest"]["memload"]["errors"]
    finally:
        down(cfg, log=lambda m: None)
    arms = {}
    for tls in (True, False):
        rs = [r for r in runs if r["tls"] is tls and r["phase"] == "completed"]
        arms["tls" if tls else "plain"] = {k: round(statistics.median(r[k] for r in rs), 3)
                                           for k in ("total_s", "precopy_s", "blackout_ms", "mbps")}
    ratio = round(arms["tls"]["precopy_s"] / arms["plain"]["precopy_s"], 2)
    data = {"guest": "1 GiB, memload 768 MiB at 50 MiB/s", "machine": machine(), "runs": runs, "median": arms,
            "tls_over_plain_precopy": ratio, "memload_errors": errors}
    md = ["# TLS vs plain migration (1 GiB guest)", "",
          f"Same guest, alternating arms, {args.rounds} rounds; medians. memload errors after all moves: {errors}.", "",
          "| arm | total s | precopy s | blackout ms | throughput Mbit/s |", "|---|---|---|---|---|"]
    for name, a in arms.items():
        md.append(f"| {name} | {a['total_s']} | {a['precopy_s']} | {a['blackout_ms']} | {a['mbps']} |")
    md += ["", f"TLS / plain precopy time: **{ratio}x**", ""]
    out = write("tls", data, "\n".join(md))
    print("\n".join(md))
    print(f"written to {out}")


if __name__ == "__main__":
    main()

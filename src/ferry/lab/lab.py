"""Bring a lab fleet up and down.

`up` makes the namespaces (hosts, fabric, client), starts one agent per host
namespace and a controller in the root namespace, and registers the hosts.
`down` ends every process the lab started (by pid, checked against its
command line), deletes its namespaces and its state folder; safe to run twice,
and it also clears what a crashed lab left behind.
"""
from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

import httpx

from ferry.lab.config import LabConfig
from ferry.lab.processes import alive, cmdline, ferry_argv, processes_mentioning, spawn, terminate
from ferry.net.addressing import LabLayout
from ferry.net.lab import LabNetwork
from ferry.qemu.image import build_image, find_image


class LabError(RuntimeError):
    pass


def _marker(cfg: LabConfig) -> str:
    return f"{cfg.state_dir}/"


def read_lab(cfg: LabConfig) -> dict | None:
    try:
        return json.loads(cfg.lab_file.read_text())
    except (OSError, ValueError):
        return None


def running_pids(cfg: LabConfig) -> list[int]:
    return [p for p in processes_mentioning(_marker(cfg)) if alive(p)]


def lab_state(cfg: LabConfig) -> str:
    """"absent", "running" (its controller is alive) or "stale" (leftovers of a lab that died)."""
    lab = read_lab(cfg)
    net = LabNetwork(LabLayout(cfg.prefix))
    if lab and alive(lab["controller"]["pid"]) and _marker(cfg) in " ".join(cmdline(lab["controller"]["pid"])):
        return "running"
    if lab or net.existing_namespaces() or running_pids(cfg) or cfg.state_dir.exists():
        return "stale"
    return "absent"


def down(cfg: LabConfig, log: Callable[[str], None] = print) -> None:
    pids = running_pids(cfg)
    if pids:
        log(f"stopping {len(pids)} lab processes (agents, controller, QEMU): {' '.join(map(str, pids))}")
        terminate(pids, _marker(cfg))
    removed = LabNetwork(LabLayout(cfg.prefix)).destroy()
    if removed:
        log(f"removed namespaces: {' '.join(removed)}")
    if cfg.state_dir.exists():
        shutil.rmtree(cfg.state_dir)
        log(f"removed {cfg.state_dir}")


def _port_free(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def _wait_http(client: httpx.Client, what: str, log_file: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    tail = log_file.read_text(errors="replace").splitlines()[-5:] if log_file.exists() else []
    raise LabError(f"{what} did not come up within {timeout_s:.0f} s; its log ({log_file}) ends: {' | '.join(tail)}")


def up(cfg: LabConfig, log: Callable[[str], None] = print) -> dict:
    state = lab_state(cfg)
    if state == "running":
        raise LabError(f"a lab is already running (state in {cfg.state_dir}); run `ferry lab down` first")
    if state == "stale":
        log("clearing leftovers of a lab that did not shut down cleanly")
        down(cfg, log)
    if not _port_free(cfg.controller_listen):
        raise LabError(f"the controller address {cfg.controller_listen} is in use; set FERRY_CONTROLLER to another")
    if find_image() is None:
        log("building the guest image (once)")
        build_image(log=log)
    layout = LabLayout(cfg.prefix)
    net = LabNetwork(layout)
    cfg.state_dir.mkdir(parents=True)
    try:
        return _start(cfg, layout, net, log)
    except BaseException:
        log("lab start failed; cleaning up")
        down(cfg, lambda _m: None)
        raise


def _agent_client(cfg: LabConfig, host: str) -> httpx.Client:
    """What the controller does: mutual TLS over the agent's socket, expecting that host's certificate."""
    from ferry.pki import client_context
    ctx = client_context(cfg.pki_dir, "controller", "controller")
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(cfg.agent_socket(host)), verify=ctx),
                        base_url=f"https://{host}")


def _make_pki(cfg: LabConfig, layout: LabLayout, names: list[str]) -> None:
    from ferry.pki import init_ca, issue
    init_ca(cfg.pki_dir, fleet=cfg.prefix)
    for index, host in enumerate(names, start=1):
        issue(cfg.pki_dir, host, "host", sans=[layout.host_underlay_ip(index)])
    issue(cfg.pki_dir, "controller", "controller")


def _start(cfg: LabConfig, layout: LabLayout, net: LabNetwork, log: Callable[[str], None]) -> dict:
    names = cfg.host_names()
    _make_pki(cfg, layout, names)
    net.create(names)
    log(f"network: fabric {layout.fabric_ns()}, client {layout.client_ns()}, hosts {', '.join(names)}")
    lab: dict = {"prefix": cfg.prefix, "created_at": time.time(), "hosts": [], "controller": {}}
    for index, host in enumerate(names, start=1):
        host_dir = cfg.host_dir(host)
        versions = host_dir / "versions.json"
        host_dir.mkdir(parents=True)
        versions.write_text(json.dumps({"bios": "1.0", "hypervisor": "7.2.22"}))
        (host_dir / "smart").write_text("PASSED\n")
        argv = ["ip", "netns", "exec", layout.host_ns(host), *ferry_argv(
            "agent", "--name", host, "--listen", f"unix:{cfg.agent_socket(host)}",
            "--underlay-ip", layout.host_underlay_ip(index), "--memory", str(cfg.host_memory_mib),
            "--vcpus", str(cfg.host_vcpus), "--state-dir", str(host_dir), "--accel", cfg.accel,
            "--fabric", f"lab:{layout.fabric_ns()}?delay={cfg.fabric_delay_s}", "--versions-file", str(versions),
            "--edac-dir", str(host_dir / "edac"), "--smart-file", str(host_dir / "smart"), "--lab-signals",
            "--pki-dir", str(cfg.pki_dir),
            *[f"--label={k}={v}" for k, v in cfg.labels(index).items()])]
        pid = spawn(argv, host_dir / "agent.log")
        lab["hosts"].append({"name": host, "netns": layout.host_ns(host), "pid": pid, "argv": argv,
                             "underlay_ip": layout.host_underlay_ip(index),
                             "agent_url": f"unix:{cfg.agent_socket(host)}", "labels": cfg.labels(index)})
    ctl_log = cfg.state_dir / "controller.log"
    cfg.manifest_file.write_text(cfg.initial_manifest())
    ctl_config = cfg.state_dir / "controller.toml"
    ctl_config.write_text(cfg.controller_config())
    ctl_pid = spawn(ferry_argv("controller", "--listen", cfg.controller_listen, "--db", str(cfg.state_dir / "ferry.db"),
                               "--config", str(ctl_config), "--manifest", str(cfg.manifest_file),
                               "--pki-dir", str(cfg.pki_dir)), ctl_log)
    lab["controller"] = {"pid": ctl_pid, "url": cfg.controller}
    cfg.lab_file.write_text(json.dumps(lab, indent=1))
    for h in lab["hosts"]:
        with _agent_client(cfg, h["name"]) as client:
            _wait_http(client, f"agent of {h['name']}", cfg.host_dir(h["name"]) / "agent.log")
    with httpx.Client(base_url=cfg.controller) as client:
        _wait_http(client, "controller", ctl_log)
        for h in lab["hosts"]:
            reply = client.post("/v1/hosts", json={"name": h["name"], "agent_url": h["agent_url"]}, timeout=30)
            if reply.status_code >= 400:
                raise LabError(f"registering {h['name']} failed: {reply.json().get('detail')}")
    log(f"lab up: {len(names)} hosts, controller at {cfg.controller}")
    return lab


def restart_agent(cfg: LabConfig, host: str) -> int:
    """End a host's agent and start it again; its VMs keep running and it re-attaches to them."""
    lab = read_lab(cfg)
    if lab is None:
        raise LabError("no lab is running here")
    entry = next((h for h in lab["hosts"] if h["name"] == host), None)
    if entry is None:
        raise LabError(f"unknown lab host {host!r}")
    terminate([entry["pid"]], _marker(cfg))
    entry["pid"] = spawn(entry["argv"], cfg.host_dir(host) / "agent.log")
    cfg.lab_file.write_text(json.dumps(lab, indent=1))
    with _agent_client(cfg, host) as client:
        _wait_http(client, f"agent of {host}", cfg.host_dir(host) / "agent.log")
    return entry["pid"]

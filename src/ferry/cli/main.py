"""`ferry`: the command line. Every listing takes --json for scripts."""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ferry.cli import render
from ferry.cli.client import ApiError, ControllerClient
from ferry.model import FerryError

app = typer.Typer(help="ferry: transparent maintenance for a fleet of VMs, by live migration.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
lab_app = typer.Typer(help="A whole fleet on this machine.", no_args_is_help=True)
vm_app = typer.Typer(help="Virtual machines.", no_args_is_help=True)
host_app = typer.Typer(help="Hosts of the fleet.", no_args_is_help=True)
migration_app = typer.Typer(help="Live migrations.", no_args_is_help=True)
image_app = typer.Typer(help="The guest image.", no_args_is_help=True)
for sub, name in ((lab_app, "lab"), (vm_app, "vm"), (host_app, "host"), (migration_app, "migration"),
                  (image_app, "image")):
    app.add_typer(sub, name=name)

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def fails_cleanly(fn):
    """A user's error is one line on stderr and exit code 1, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ferry.lab.lab import LabError
        from ferry.net.errors import NetError
        from ferry.pki import PkiError
        from ferry.qemu.image import ImageBuildError
        try:
            return fn(*args, **kwargs)
        except (ApiError, FerryError, LabError, NetError, ImageBuildError, PkiError) as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
    return wrapper


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def show(path: str, as_json: bool, table=None, **params) -> None:
    """GET `path` from the controller; print it as JSON, or as `table(data)` (a Rich table)."""
    data = ControllerClient().get(path, params=params or None)
    if as_json:
        emit_json(data)
    elif table is not None:
        out.print(table(data))
    else:
        out.print_json(data=data)


# ---- servers --------------------------------------------------------------------------------
@app.command()
@fails_cleanly
def agent(name: str = typer.Option(..., help="host name"),
          listen: str = typer.Option("127.0.0.1:8700", help="HOST:PORT or unix:/path"),
          underlay_ip: str = typer.Option(..., help="address migration streams arrive at"),
          memory: int = typer.Option(4096, help="MiB offered to VMs"),
          vcpus: int = typer.Option(4),
          state_dir: Path = typer.Option(Path("/var/lib/ferry/agent")),
          accel: str = typer.Option("tcg", help="tcg, or kvm on real hosts"),
          fabric: str = typer.Option("none", help="none, or lab:<fabric namespace>"),
          versions_file: Optional[Path] = typer.Option(None),
          image_dir: Optional[Path] = typer.Option(None),
          label: list[str] = typer.Option([], help="KEY=VALUE, repeatable"),
          edac_dir: Path = typer.Option(Path("/sys/devices/system/edac"), help="EDAC counters (mc*/ce_count)"),
          smart_file: Optional[Path] = typer.Option(None, help="file with the disk's SMART health result"),
          lab_signals: bool = typer.Option(False, help="lab host: allow injected health signals"),
          maintenance_hook: Optional[str] = typer.Option(None, help="command the maintenance action runs"),
          metadata: str = typer.Option("169.254.169.254:80", help="guest metadata server address, or off"),
          pki_dir: Optional[Path] = typer.Option(None, help="fleet PKI folder: HTTPS with client certs, TLS migration")):
    """Run a host agent."""
    from ferry.agent.main import run_agent
    from ferry.agent.settings import AgentSettings
    labels = dict(item.split("=", 1) for item in label)
    run_agent(AgentSettings(name=name, underlay_ip=underlay_ip, memory_mib=memory, vcpus=vcpus,
                            state_dir=state_dir, image_dir=image_dir, accel=accel, fabric=fabric,
                            labels=labels, versions_file=versions_file, edac_dir=edac_dir,
                            smart_file=smart_file, lab_signals=lab_signals,
                            maintenance_hook=maintenance_hook, metadata=metadata, pki_dir=pki_dir), listen)


@app.command()
@fails_cleanly
def controller(listen: str = typer.Option("127.0.0.1:8787"),
               db: Path = typer.Option(Path("/var/lib/ferry/ferry.db"), help="SQLite file"),
               config: Optional[Path] = typer.Option(None, help="TOML: [planner], [health], [migration]"),
               manifest: Optional[Path] = typer.Option(None, help="fleet manifest (TOML), watched for changes"),
               pki_dir: Optional[Path] = typer.Option(None, help="fleet PKI folder: mutual TLS to agents and streams")):
    """Run the controller."""
    from ferry.controller.config import load_config
    from ferry.controller.main import run_controller
    run_controller(db, listen, load_config(config, manifest, pki_dir))


# ---- pki ------------------------------------------------------------------------------------
pki_app = typer.Typer(help="The fleet PKI: a CA and certificates for hosts, the controller and clients.",
                      no_args_is_help=True)
app.add_typer(pki_app, name="pki")
PKI_DIR = typer.Option(Path("/etc/ferry/pki"), "--dir", help="PKI folder")


@pki_app.command("init")
@fails_cleanly
def pki_init_cmd(pki_dir: Path = PKI_DIR, fleet: str = typer.Option("ferry"), force: bool = typer.Option(False)):
    """Make the fleet CA."""
    from ferry.pki.cli import pki_init
    paths = pki_init(pki_dir, fleet, force)
    out.print(f"fleet CA {fleet}: {paths.cert}")


@pki_app.command("issue")
@fails_cleanly
def pki_issue_cmd(name: str, pki_dir: Path = PKI_DIR,
                  kind: str = typer.Option("host", help="host, controller or client"),
                  san: list[str] = typer.Option([], help="extra subject names (IP or DNS), repeatable")):
    """Issue a key and certificate naming NAME (keys are written 0600)."""
    from ferry.pki.cli import pki_issue
    paths = pki_issue(pki_dir, name, kind, san)
    out.print(f"{kind} {name}: {paths.cert} {paths.key}")


@pki_app.command("check")
@fails_cleanly
def pki_check_cmd(name: str, pki_dir: Path = PKI_DIR, kind: Optional[str] = typer.Option(None)):
    """Validate an identity as an agent or controller would at start-up."""
    from ferry.pki.cli import pki_check
    ident = pki_check(pki_dir, name, kind)
    out.print(f"{ident.kind} {ident.name}: {ident.subject}, valid until {ident.not_after}")


# ---- image ----------------------------------------------------------------------------------
@image_app.command("build")
@fails_cleanly
def image_build(force: bool = typer.Option(False, help="rebuild even if present")):
    """Build the guest image (Debian cloud kernel + busybox initramfs with memload)."""
    from ferry.qemu.image import build_image
    image = build_image(force=force, log=lambda m: out.print(m, highlight=False))
    out.print(f"guest image ready: kernel {image.kernel_version}\n  {image.kernel}\n  {image.initrd}")


# ---- lab ------------------------------------------------------------------------------------
def _lab_config(**overrides):
    from ferry.lab.config import LabConfig
    return LabConfig(**{k: v for k, v in overrides.items() if v is not None})


@lab_app.command("up")
@fails_cleanly
def lab_up(hosts: int = typer.Option(3, min=1, max=250),
           host_memory: int = typer.Option(4096, help="MiB each lab host offers to VMs"),
           host_vcpus: int = typer.Option(4),
           accel: str = typer.Option("tcg")):
    """Bring up a lab fleet: HOSTS namespaces with an agent each, a fabric, a client, a controller."""
    from ferry.lab.lab import up
    up(_lab_config(hosts=hosts, host_memory_mib=host_memory, host_vcpus=host_vcpus, accel=accel),
       log=lambda m: out.print(m, highlight=False))


@lab_app.command("down")
@fails_cleanly
def lab_down():
    """Remove every namespace, process and file the lab made (safe to run twice)."""
    from ferry.lab.lab import down
    down(_lab_config(), log=lambda m: out.print(m, highlight=False))
    out.print("lab down")


@lab_app.command("status")
@fails_cleanly
def lab_status(as_json: bool = typer.Option(False, "--json")):
    """Is a lab running here?"""
    from ferry.lab.lab import lab_state, read_lab
    cfg = _lab_config()
    data = {"state": lab_state(cfg), "lab": read_lab(cfg)}
    if as_json:
        emit_json(data)
    else:
        out.print(f"lab {cfg.prefix}: {data['state']}")


@lab_app.command("restart-agent")
@fails_cleanly
def lab_restart_agent(host: str):
    """Restart one host's agent (its VMs keep running; it re-attaches to them)."""
    from ferry.lab.lab import restart_agent
    pid = restart_agent(_lab_config(), host)
    out.print(f"agent of {host} restarted (pid {pid})")


@lab_app.command("http")
@fails_cleanly
def lab_http(vm: str, path: str = typer.Option("/cgi-bin/status")):
    """GET http://<VM IP><path> from the lab's client namespace."""
    from ferry.lab.probe import from_client
    ip = ControllerClient().get(f"/v1/vms/{vm}")["ip"]
    result = from_client(_lab_config().prefix, "http", f"http://{ip}{path}")
    if result.returncode != 0:
        raise ApiError(result.stderr.strip() or f"no HTTP answer from {vm} at {ip}")
    sys.stdout.write(result.stdout + ("\n" if not result.stdout.endswith("\n") else ""))


@app.command("probe")
@fails_cleanly
def probe(vm: str, duration: float = typer.Option(10.0, min=1, max=300, help="seconds"),
          as_json: bool = typer.Option(False, "--json")):
    """Lab: from the client namespace, hold an echo connection (a line every 10 ms) and send short
    HTTP requests to VM; report the longest gap, failed requests, and whether the connection survived."""
    from ferry.lab.traffic import collect, run_probe_in_client
    ip = ControllerClient().get(f"/v1/vms/{vm}")["ip"]
    report = collect(run_probe_in_client(_lab_config().prefix, ip, duration))
    if as_json:
        emit_json(report)
    else:
        out.print_json(data=report)


# ---- hosts ----------------------------------------------------------------------------------
@host_app.command("list")
@fails_cleanly
def host_list(as_json: bool = typer.Option(False, "--json")):
    show("/v1/hosts", as_json, render.hosts_table)


@host_app.command("show")
@fails_cleanly
def host_show(name: str, as_json: bool = typer.Option(False, "--json")):
    show(f"/v1/hosts/{name}", as_json)


@host_app.command("drain")
@fails_cleanly
def host_drain(name: str):
    """Move every VM off HOST and leave it in maintenance (until `ferry host undrain`)."""
    e = ControllerClient().post(f"/v1/hosts/{name}/drain", {})
    out.print(f"draining {name}: maintenance event {e['id']}")


@host_app.command("undrain")
@fails_cleanly
def host_undrain(name: str):
    """Return HOST to service (cancels its drain if one is under way)."""
    h = ControllerClient().post(f"/v1/hosts/{name}/undrain", {})
    out.print(f"{name} is {h['state']}")


@host_app.command("signal")
@fails_cleanly
def host_signal(name: str, signals: list[str] = typer.Argument(..., help="ecc=N and/or disk=PASSED|FAILED")):
    """Lab: inject a health signal on HOST (corrected memory errors, disk health)."""
    body: dict = {}
    for item in signals:
        key, sep, value = item.partition("=")
        if not sep or key not in ("ecc", "disk"):
            raise ApiError(f"malformed signal {item!r}: use ecc=N or disk=PASSED|FAILED")
        if key == "ecc":
            if not value.isdigit():
                raise ApiError(f"malformed signal {item!r}: ecc must be a whole number")
            body["ecc"] = int(value)
        else:
            body["disk"] = value.upper()
    emit_json(ControllerClient().post(f"/v1/hosts/{name}/signal", body))


@host_app.command("add")
@fails_cleanly
def host_add(name: str, agent_url: str = typer.Option(..., help="http://host:port or unix:/path")):
    """Register a host whose agent runs at AGENT_URL."""
    emit_json(ControllerClient().post("/v1/hosts", {"name": name, "agent_url": agent_url}))


# ---- VMs ------------------------------------------------------------------------------------
@vm_app.command("create")
@fails_cleanly
def vm_create(name: str,
              memory: int = typer.Option(512, help="MiB"),
              vcpus: int = typer.Option(1),
              workload: str = typer.Option("idle", help="idle, or memload:rate=MiB_PER_S[,size=MiB]"),
              host: Optional[str] = typer.Option(None, help="pin to this host instead of letting the scheduler pick"),
              on_host_maintenance: str = typer.Option("migrate", help="migrate, or terminate (shut down, restart after)"),
              migration_policy: Optional[str] = typer.Option(None, help="convergence policy, e.g. no-postcopy"),
              wait: bool = typer.Option(True, help="wait until the guest answers on its status page"),
              as_json: bool = typer.Option(False, "--json")):
    """Boot a VM on a host the scheduler picks."""
    api = ControllerClient()
    vm = api.post("/v1/vms", {"name": name, "memory_mib": memory, "vcpus": vcpus, "workload": workload,
                              "host": host, "on_host_maintenance": on_host_maintenance,
                              "migration_policy": migration_policy})
    if wait:
        with out.status(f"booting {name} on {vm['host']}…"):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                guest = api.get(f"/v1/vms/{name}").get("guest") or {}
                if "error" not in guest:
                    break
                time.sleep(0.5)
            else:
                raise ApiError(f"VM {name} booted on {vm['host']} but its guest did not answer within 120 s")
    if as_json:
        emit_json(vm)
    else:
        out.print(f"VM {name} running on {vm['host']} at {vm['ip']}")


@vm_app.command("list")
@fails_cleanly
def vm_list(as_json: bool = typer.Option(False, "--json")):
    show("/v1/vms", as_json, render.vms_table)


@vm_app.command("show")
@fails_cleanly
def vm_show(name: str, as_json: bool = typer.Option(False, "--json")):
    """Spec, placement, state, and the guest's live status page."""
    show(f"/v1/vms/{name}", as_json)


@vm_app.command("delete")
@fails_cleanly
def vm_delete(name: str):
    ControllerClient().delete(f"/v1/vms/{name}")
    out.print(f"VM {name} deleted")


@vm_app.command("migrate")
@fails_cleanly
def vm_migrate(name: str,
               to: Optional[str] = typer.Option(None, "--to", help="target host (default: the scheduler picks)"),
               verify_memory: bool = typer.Option(False, help="compare guest RAM page by page before resuming"),
               policy: Optional[str] = typer.Option(None, help="convergence policy (balanced, min-blackout, no-postcopy, ...)"),
               wait: bool = typer.Option(True),
               as_json: bool = typer.Option(False, "--json")):
    """Live-migrate a VM, with a progress bar."""
    api = ControllerClient()
    m = api.post("/v1/migrations", {"vm": name, "target": to, "verify_memory": verify_memory, "policy": policy})
    if wait:
        m = _follow(api, m, quiet=as_json)
    if as_json:
        emit_json(m)
    else:
        out.print(render.timeline_table(m))
        out.print(render.stats_table(m))
        out.print(render.decisions_table(m))
        if m.get("error"):
            err.print(f"[red]{m['phase']}:[/red] {m['error']}", highlight=False)
    if m["phase"] in ("aborted", "failed"):
        raise typer.Exit(1)


def _follow(api: ControllerClient, m: dict, quiet: bool) -> dict:
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=err, disable=quiet, transient=False) as progress:
        task = progress.add_task(f"{m['vm']} {m['source']}→{m['target']}", total=1, detail="")
        while True:
            m = api.get(f"/v1/migrations/{m['id']}")
            p = m.get("progress") or {}
            total = p.get("total") or 0
            if total:
                progress.update(task, total=total, completed=max(0, total - p.get("remaining", 0)))
            progress.update(task, detail=(
                f"{m['phase']:<13} sent {render.mib(p.get('transferred'))}  left {render.mib(p.get('remaining'))}"
                f"  dirty {p.get('dirty_rate_mib_s', 0):.0f} MiB/s"))
            if m["phase"] in ("completed", "aborted", "failed"):
                if m["phase"] == "completed" and total:
                    progress.update(task, completed=total)
                return m
            time.sleep(0.25)


# ---- maintenance ----------------------------------------------------------------------------
maintenance_app = typer.Typer(help="Maintenance events.", no_args_is_help=True)
app.add_typer(maintenance_app, name="maintenance")


def parse_when(text: str | None) -> float | None:
    """`+30s`, `+5m`, an ISO time, or seconds since the epoch."""
    import datetime as dt
    if text is None:
        return None
    t = text.strip()
    if t.startswith("+"):
        units = {"s": 1, "m": 60, "h": 3600}
        n, unit = (t[1:-1], t[-1]) if t[-1] in units else (t[1:], "s")
        if not n.replace(".", "", 1).isdigit():
            raise ApiError(f"malformed time {text!r}: use +30s, +5m, an ISO time or epoch seconds")
        return time.time() + float(n) * units[unit]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        raise ApiError(f"malformed time {text!r}: use +30s, +5m, an ISO time or epoch seconds") from None
    return when.timestamp()


@maintenance_app.command("schedule")
@fails_cleanly
def maintenance_schedule(hosts: list[str], at: Optional[str] = typer.Option(None, help="+30s, +5m, ISO time"),
                         reason: str = typer.Option("scheduled by operator"),
                         policy: Optional[str] = typer.Option(None, help="convergence policy for its moves"),
                         as_json: bool = typer.Option(False, "--json")):
    """Schedule maintenance of HOSTS: drain, run the maintenance action, return to service."""
    e = ControllerClient().post("/v1/maintenance", {"hosts": hosts, "at": parse_when(at), "reason": reason,
                                                    "migration_policy": policy})
    emit_json(e) if as_json else out.print(f"maintenance event {e['id']} for {', '.join(e['hosts'])}: {e['state']}")


@maintenance_app.command("list")
@fails_cleanly
def maintenance_list(as_json: bool = typer.Option(False, "--json")):
    show("/v1/maintenance", as_json, render.events_table)


@maintenance_app.command("show")
@fails_cleanly
def maintenance_show(event_id: str, as_json: bool = typer.Option(False, "--json")):
    e = ControllerClient().get(f"/v1/maintenance/{event_id}")
    if as_json:
        emit_json(e)
        return
    out.print(render.events_table([e]))
    out.print(render.event_log(e))


@maintenance_app.command("cancel")
@fails_cleanly
def maintenance_cancel(event_id: str):
    e = ControllerClient().post(f"/v1/maintenance/{event_id}/cancel", {})
    out.print(f"maintenance event {e['id']}: {e['state']}")


@app.command("manifest")
@fails_cleanly
def manifest_status(as_json: bool = typer.Option(False, "--json")):
    """The fleet manifest in force, and the error of the last rejected one."""
    show("/v1/manifest", True)


# ---- migrations -----------------------------------------------------------------------------
@migration_app.command("list")
@fails_cleanly
def migration_list(vm: Optional[str] = typer.Option(None), as_json: bool = typer.Option(False, "--json")):
    show("/v1/migrations", as_json, render.migrations_table, **({"vm": vm} if vm else {}))


@migration_app.command("show")
@fails_cleanly
def migration_show(migration_id: str, as_json: bool = typer.Option(False, "--json")):
    """Phase timeline and statistics of one migration."""
    m = ControllerClient().get(f"/v1/migrations/{migration_id}")
    if as_json:
        emit_json(m)
        return
    out.print(render.timeline_table(m))
    out.print(render.stats_table(m))
    out.print(render.prediction_table(m))
    out.print(render.decisions_table(m))
    if m.get("error"):
        out.print(f"[red]{m['phase']}:[/red] {m['error']}", highlight=False)


if __name__ == "__main__":
    app()

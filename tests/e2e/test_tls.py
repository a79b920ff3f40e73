"""Mutual TLS between fleet members: agent API calls and every migration stream."""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from ferry.pki import client_context, init_ca, issue

pytestmark = pytest.mark.e2e


@contextmanager
def swapped_qemu_creds(lab, host: str, replacement: Path):
    """Give `host`'s QEMU other credentials for a while (the agent loads them per migration)."""
    creds = lab.cfg.host_dir(host) / "qemu-tls"
    saved = creds.with_name("qemu-tls.saved")
    shutil.copytree(creds, saved)
    try:
        for f in replacement.iterdir():
            shutil.copy2(f, creds / f.name)
        yield
    finally:
        shutil.rmtree(creds)
        saved.rename(creds)


def creds_from(identity_dir: Path, ca_cert: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ca_cert, dest / "ca-cert.pem")
    for role in ("server", "client"):
        shutil.copy2(identity_dir / "cert.pem", dest / f"{role}-cert.pem")
        shutil.copy2(identity_dir / "key.pem", dest / f"{role}-key.pem")
    return dest


def assert_refused_and_rolled_back(lab, vm: str, source: str, target: str) -> dict:
    used_before = {h["name"]: h["used_memory_mib"] for h in lab.api.get("/v1/hosts")}
    result = lab.ferry("vm", "migrate", vm, "--to", target, "--json", check=False)
    assert result.returncode == 1
    m = lab.api.get("/v1/migrations", params={"vm": vm})[-1]
    assert m["phase"] == "aborted" and m["tls"], m
    assert m["error"], m
    detail = lab.api.get(f"/v1/vms/{vm}")
    assert detail["host"] == source and detail["state"] == "running" and detail["agent"]["runstate"] == "running"
    assert vm not in lab.api.get(f"/v1/hosts/{target}")["inventory"]["vms"]
    assert {h["name"]: h["used_memory_mib"] for h in lab.api.get("/v1/hosts")} == used_before
    return m


def test_migration_streams_are_tls_by_default(lab):
    lab.create_vm("tls-ok", host="host-1")
    m = lab.ferry_json("vm", "migrate", "tls-ok", "--to", "host-2")
    assert m["phase"] == "completed" and m["tls"] is True
    lab.ferry("vm", "delete", "tls-ok")


def test_stream_from_a_host_of_another_ca_is_refused(lab, tmp_path):
    rogue = tmp_path / "rogue"
    init_ca(rogue, fleet="rogue")
    issue(rogue, "host-2", "host")
    creds = creds_from(rogue / "hosts" / "host-2", rogue / "ca" / "ca-cert.pem", tmp_path / "creds")
    lab.create_vm("tls-a", host="host-2")
    with swapped_qemu_creds(lab, "host-2", creds):
        assert_refused_and_rolled_back(lab, "tls-a", "host-2", "host-1")
    m = lab.ferry_json("vm", "migrate", "tls-a", "--to", "host-1")     # and with its own credentials it moves
    assert m["phase"] == "completed"
    lab.ferry("vm", "delete", "tls-a")


def test_stream_from_a_fleet_host_that_is_not_the_named_source_is_refused(lab, tmp_path):
    pki = lab.cfg.pki_dir
    creds = creds_from(pki / "hosts" / "host-3", pki / "ca" / "ca-cert.pem", tmp_path / "creds")
    lab.create_vm("tls-b", host="host-2")
    with swapped_qemu_creds(lab, "host-2", creds):
        m = assert_refused_and_rolled_back(lab, "tls-b", "host-2", "host-1")
    assert "TLS" in m["error"] or "tls" in m["error"].lower()
    lab.ferry("vm", "delete", "tls-b")


def test_agent_api_requires_a_fleet_client_certificate(lab, tmp_path):
    sock = str(lab.cfg.agent_socket("host-1"))
    good = httpx.Client(transport=httpx.HTTPTransport(uds=sock, verify=client_context(lab.cfg.pki_dir, "controller", "controller")),
                        base_url="https://host-1")
    assert good.get("/healthz").json()["host"] == "host-1"
    # Without a client certificate: the handshake fails.
    import ssl
    anon = ssl.create_default_context(cafile=str(lab.cfg.pki_dir / "ca" / "ca-cert.pem"))
    with pytest.raises(httpx.HTTPError):
        httpx.Client(transport=httpx.HTTPTransport(uds=sock, verify=anon), base_url="https://host-1").get("/healthz")
    # With a certificate of another CA: refused too.
    rogue = tmp_path / "rogue"
    init_ca(rogue, fleet="rogue")
    issue(rogue, "controller", "controller")
    ctx = ssl.create_default_context(cafile=str(lab.cfg.pki_dir / "ca" / "ca-cert.pem"))
    ctx.load_cert_chain(rogue / "controllers" / "controller" / "cert.pem", rogue / "controllers" / "controller" / "key.pem")
    with pytest.raises(httpx.HTTPError):
        httpx.Client(transport=httpx.HTTPTransport(uds=sock, verify=ctx), base_url="https://host-1").get("/healthz")
    # And an agent expecting to be host-1 is not accepted as host-2 by the controller's check.
    with pytest.raises(httpx.HTTPError):
        httpx.Client(transport=httpx.HTTPTransport(uds=sock, verify=client_context(lab.cfg.pki_dir, "controller", "controller")),
                     base_url="https://host-2").get("/healthz")


@pytest.mark.parametrize("problem, words", [
    ("expired", "expired"),
    ("not-yet-valid", "not yet valid"),
    ("wrong-key", "does not match"),
])
def test_agent_refuses_to_start_with_a_bad_certificate(tmp_path, problem, words):
    pki = tmp_path / "pki"
    init_ca(pki)
    now = dt.datetime.now(dt.timezone.utc)
    if problem == "expired":
        issue(pki, "host-9", "host", not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1))
    elif problem == "not-yet-valid":
        issue(pki, "host-9", "host", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=10))
    else:
        issue(pki, "host-9", "host")
        issue(pki, "host-8", "host")
        shutil.copy2(pki / "hosts" / "host-8" / "key.pem", pki / "hosts" / "host-9" / "key.pem")
    result = subprocess.run([sys.executable, "-m", "ferry.cli.main", "agent", "--name", "host-9", "--underlay-ip",
                             "127.0.0.1", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                             "--metadata", "off", "--pki-dir", str(pki)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.startswith("error:") and len(message.splitlines()) == 1 and words in message, message

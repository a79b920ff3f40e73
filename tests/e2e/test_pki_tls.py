"""The fleet PKI with its real consumers, all on loopback.

a. uvicorn serving mutual TLS (TCP and a unix socket), httpx as the client;
b. QEMU 7.2 migration streams over TLS with `tls-creds-x509` + `authz-simple`
   (two empty TCG VMs, no guest kernel).

No lab, no namespaces: nothing here touches a running lab fleet.
"""
from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
import uvicorn
from qemu.qmp import QMPClient

from ferry.pki import client_context, dn_for, init_ca, issue, qemu_creds_dir, uvicorn_ssl_kwargs

pytestmark = pytest.mark.e2e

QEMU = shutil.which("qemu-system-x86_64")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def pki(tmp_path) -> Path:
    d = tmp_path / "pki"
    init_ca(d, fleet="ferry")
    for host in ("host-1", "host-2", "host-3"):
        issue(d, host, "host", sans=["127.0.0.1"])
    issue(d, "controller", "controller")
    return d


@pytest.fixture
def other_pki(tmp_path) -> Path:
    """Another CA with the SAME fleet name and host names: only the CA key differs."""
    d = tmp_path / "other-pki"
    init_ca(d, fleet="ferry")
    issue(d, "host-2", "host", sans=["127.0.0.1"])
    issue(d, "controller", "controller")
    return d


@pytest.fixture
def short_dir():
    """A short folder for unix sockets (sun_path is limited to 108 bytes; pytest's tmp_path can be longer)."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="ferry-pki-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- a. uvicorn + httpx


async def hello_app(scope, receive, send):
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello from host-1"})


class Served:
    def __init__(self, **config):
        self.server = uvicorn.Server(uvicorn.Config(hello_app, lifespan="off", log_level="critical", **config))
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        self.task = asyncio.create_task(self.server.serve())
        for _ in range(200):
            if self.server.started:
                return self
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.02)
        raise AssertionError("uvicorn did not start")

    async def __aexit__(self, *exc):
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 10)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]


def no_cert_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca/ca-cert.pem")
    return ctx


def foreign_cert_context(pki: Path, other: Path) -> ssl.SSLContext:
    """Trusts the fleet CA (accepts the server), presents a certificate of another CA."""
    ctx = no_cert_context(pki)
    ctx.load_cert_chain(other / "controllers/controller/cert.pem", other / "controllers/controller/key.pem")
    return ctx


async def get_tcp(ctx: ssl.SSLContext, port: int, expect: str = "host-1") -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(verify=ctx), timeout=5) as c:
        return await c.get(f"https://127.0.0.1:{port}/", extensions={"sni_hostname": expect})


async def get_uds(ctx: ssl.SSLContext, path: Path, expect: str = "host-1") -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(uds=str(path), verify=ctx)
    async with httpx.AsyncClient(transport=transport, base_url=f"https://{expect}", timeout=5) as c:
        return await c.get("/")


async def test_uvicorn_mtls_over_tcp(pki, other_pki):
    async with Served(host="127.0.0.1", port=0, **uvicorn_ssl_kwargs(pki, "host-1", "host")) as srv:
        ok = await get_tcp(client_context(pki, "controller"), srv.port)
        assert ok.status_code == 200 and ok.text == "hello from host-1"
        # a host certificate is a client certificate too
        assert (await get_tcp(client_context(pki, "host-2"), srv.port)).status_code == 200

        with pytest.raises(httpx.TransportError):
            await get_tcp(no_cert_context(pki), srv.port)
        with pytest.raises(httpx.TransportError):
            await get_tcp(foreign_cert_context(pki, other_pki), srv.port)
        # the client names the host it expects; host-1's certificate is not host-2's
        with pytest.raises(httpx.ConnectError, match="Hostname mismatch"):
            await get_tcp(client_context(pki, "controller"), srv.port, expect="host-2")
        # still serving after the refusals
        assert (await get_tcp(client_context(pki, "controller"), srv.port)).status_code == 200


async def test_uvicorn_mtls_over_unix_socket(pki, other_pki, short_dir):
    sock = short_dir / "agent.sock"
    async with Served(uds=str(sock), **uvicorn_ssl_kwargs(pki, "host-1", "host")):
        ok = await get_uds(client_context(pki, "controller"), sock)
        assert ok.status_code == 200 and ok.text == "hello from host-1"

        # base_url host = the expected peer: another name fails the certificate check
        with pytest.raises(httpx.ConnectError, match="Hostname mismatch"):
            await get_uds(client_context(pki, "controller"), sock, expect="host-2")
        with pytest.raises(httpx.TransportError):
            await get_uds(no_cert_context(pki), sock)
        with pytest.raises(httpx.TransportError):
            await get_uds(foreign_cert_context(pki, other_pki), sock)
        # a server certificate from another CA is refused by the client
        assert (await get_uds(client_context(pki, "controller"), sock)).status_code == 200


async def test_client_refuses_a_server_of_another_ca(pki, other_pki, short_dir):
    sock = short_dir / "evil.sock"
    issue(other_pki, "host-1", "host")
    async with Served(uds=str(sock), **uvicorn_ssl_kwargs(other_pki, "host-1", "host")):
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await get_uds(client_context(pki, "controller"), sock)


# --------------------------------------------------------------------------- b. QEMU migration over TLS


class Vm:
    def __init__(self, proc: subprocess.Popen, qmp_path: Path, log: Path):
        self.proc, self.qmp_path, self.log = proc, qmp_path, log
        self.qmp = QMPClient(qmp_path.name)

    async def connect(self) -> None:
        for _ in range(200):
            try:
                await self.qmp.connect(str(self.qmp_path))
                return
            except Exception:
                if self.proc.poll() is not None:
                    raise AssertionError(f"QEMU exited: {self.log.read_text()}")
                await asyncio.sleep(0.05)
        raise AssertionError(f"no QMP socket {self.qmp_path}")

    async def run(self, cmd: str, args: dict | None = None):
        return await asyncio.wait_for(self.qmp.execute(cmd, args), 10)

    async def status(self) -> str:
        return (await self.run("query-status"))["status"]


@pytest.fixture
async def qemus(short_dir):
    """Start QEMUs on demand; teardown kills each by PID."""
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    vms: list[Vm] = []

    async def start(name: str, incoming: bool) -> Vm:
        qmp = short_dir / f"{name}.qmp"
        log = short_dir / f"{name}.log"
        argv = [QEMU, "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{qmp},server=on,wait=off"]
        if incoming:
            argv += ["-incoming", "defer"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        vm = Vm(proc, qmp, log)
        vms.append(vm)
        await vm.connect()
        return vm

    yield start
    for vm in vms:
        try:
            await vm.qmp.disconnect()
        except Exception:
            pass
        if vm.proc.poll() is None:
            vm.proc.kill()  # Popen.kill = kill(pid, SIGKILL) of this one process
        vm.proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def tls_target(qemus, creds: Path, allowed_dn: str) -> tuple[Vm, str]:
    target = await qemus("target", incoming=True)
    await target.run("object-add", {"qom-type": "tls-creds-x509", "id": "mig-tls", "dir": str(creds),
                                    "endpoint": "server", "verify-peer": True})
    await target.run("object-add", {"qom-type": "authz-simple", "id": "mig-authz", "identity": allowed_dn})
    await target.run("migrate-set-parameters", {"tls-creds": "mig-tls", "tls-authz": "mig-authz"})
    uri = f"tcp:127.0.0.1:{free_port()}"
    await target.run("migrate-incoming", {"uri": uri})
    return target, uri


async def tls_migrate(qemus, creds: Path, uri: str, target_name: str) -> tuple[Vm, dict]:
    source = await qemus("source", incoming=False)
    assert await source.status() == "running"
    await source.run("object-add", {"qom-type": "tls-creds-x509", "id": "mig-tls", "dir": str(creds),
                                    "endpoint": "client", "verify-peer": True})
    await source.run("migrate-set-parameters", {"tls-creds": "mig-tls", "tls-hostname": target_name})
    await source.run("migrate", {"uri": uri})
    for _ in range(300):
        info = await source.run("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return source, info
        await asyncio.sleep(0.1)
    raise AssertionError(f"migration did not end: {info}")


async def target_log(target: Vm, needle: str) -> str:
    for _ in range(50):
        text = target.log.read_text(errors="replace")
        if needle in text:
            return text
        await asyncio.sleep(0.1)
    return target.log.read_text(errors="replace")


def creds(pki: Path, host: str, dest: Path) -> Path:
    return qemu_creds_dir(pki, host, dest)


async def test_qemu_tls_migration_named_source_completes(pki, qemus, tmp_path):
    source_dn = dn_for(pki / "hosts/host-2/cert.pem")
    assert source_dn == "C=XX,O=ferry,CN=host-2"
    target, uri = await tls_target(qemus, creds(pki, "host-1", tmp_path / "t"), source_dn)
    source, info = await tls_migrate(qemus, creds(pki, "host-2", tmp_path / "s"), uri, "host-1")
    assert info["status"] == "completed", info
    assert await source.status() == "postmigrate"
    assert await target.status() == "running"


async def test_qemu_denies_the_rfc4514_reversed_dn(pki, qemus, tmp_path):
    """What QEMU compares: the certificate-order DN. The RFC 4514 (reversed) string is denied."""
    target, uri = await tls_target(qemus, creds(pki, "host-1", tmp_path / "t"), "CN=host-2,O=ferry,C=XX")
    source, info = await tls_migrate(qemus, creds(pki, "host-2", tmp_path / "s"), uri, "host-1")
    assert info["status"] == "failed", info
    assert await source.status() == "running"
    log = await target_log(target, "denied")
    assert "TLS x509 authz check for C=XX,O=ferry,CN=host-2 is denied" in log


async def test_qemu_refuses_a_source_of_another_ca(pki, other_pki, qemus, tmp_path):
    # same CN (host-2) and the DN the target allows: only the CA differs
    assert dn_for(other_pki / "hosts/host-2/cert.pem") == dn_for(pki / "hosts/host-2/cert.pem")
    target, uri = await tls_target(qemus, creds(pki, "host-1", tmp_path / "t"), dn_for(pki / "hosts/host-2/cert.pem"))
    # The source trusts both CAs (QEMU checks its own certificate against its ca-cert.pem, and it
    # must accept the target), so only the target's check can refuse: its certificate is foreign.
    src = creds(other_pki, "host-2", tmp_path / "s")
    (src / "ca-cert.pem").write_bytes((other_pki / "ca/ca-cert.pem").read_bytes() +
                                      (pki / "ca/ca-cert.pem").read_bytes())
    source, info = await tls_migrate(qemus, src, uri, "host-1")
    assert info["status"] == "failed", info
    assert await source.status() == "running"
    log = await target_log(target, "known issuer")
    assert "The certificate hasn't got a known issuer" in log, log  # GnuTLS's words, logged by the target
    assert "denied" not in log  # refused by the CA check, before authz


async def test_qemu_refuses_a_fleet_source_that_is_not_the_named_one(pki, qemus, tmp_path):
    target, uri = await tls_target(qemus, creds(pki, "host-1", tmp_path / "t"), dn_for(pki / "hosts/host-2/cert.pem"))
    source, info = await tls_migrate(qemus, creds(pki, "host-3", tmp_path / "s"), uri, "host-1")
    assert info["status"] == "failed", info
    assert await source.status() == "running"
    log = await target_log(target, "denied")
    assert "TLS x509 authz check for C=XX,O=ferry,CN=host-3 is denied" in log


async def test_qemu_source_refuses_a_target_that_is_not_the_named_one(pki, qemus, tmp_path):
    """tls-hostname: the source checks the target's certificate names the host it meant."""
    target, uri = await tls_target(qemus, creds(pki, "host-1", tmp_path / "t"), dn_for(pki / "hosts/host-2/cert.pem"))
    source, info = await tls_migrate(qemus, creds(pki, "host-2", tmp_path / "s"), uri, "host-3")
    assert info["status"] == "failed", info
    assert info.get("error-desc") == "Certificate does not match the hostname host-3", info
    assert await source.status() == "running"

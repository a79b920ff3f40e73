"""ferry.pki.tlsctx: mutual TLS contexts, exercised with in-memory handshakes."""
from __future__ import annotations

import ssl

import pytest

from ferry.pki import PkiError, client_context, https_url, init_ca, issue, server_context, uvicorn_ssl_kwargs
from ferry.pki.validate import validate_identity


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    init_ca(d)
    issue(d, "host-1", "host")
    issue(d, "host-2", "host")
    issue(d, "controller", "controller")
    issue(d, "alice", "client")
    return d


@pytest.fixture
def other(tmp_path):
    d = tmp_path / "other"
    init_ca(d, fleet="ferry")  # same fleet name, different CA key
    issue(d, "controller", "controller")
    issue(d, "host-1", "host")
    return d


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, server_hostname: str | None):
    """Run a TLS handshake in memory; returns (client exception, server exception, server's view of peer)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    errors: dict[str, Exception] = {}
    done = {"c": False, "s": False}
    for _ in range(20):
        for side, obj in (("c", c), ("s", s)):
            if done[side] or side in errors:
                continue
            try:
                obj.do_handshake()
                done[side] = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLError as e:
                errors[side] = e
        if c_out.pending:
            s_in.write(c_out.read())
        if s_out.pending:
            c_in.write(s_out.read())
        if (done["c"] or "c" in errors) and (done["s"] or "s" in errors) and not c_out.pending and not s_out.pending:
            break
    # TLS 1.3: the client finishes before the server has checked its certificate; a read shows the alert
    if done["c"] and "s" in errors:
        try:
            c.read(1)
        except ssl.SSLError as e:
            errors["c"] = e
    peer = s.getpeercert() if done["s"] else None
    return errors.get("c"), errors.get("s"), peer


def test_mutual_tls_ok(pki):
    cerr, serr, peer = handshake(client_context(pki, "controller"), server_context(pki, "host-1"), "host-1")
    assert cerr is None and serr is None
    assert dict(x[0] for x in peer["subject"])["commonName"] == "controller"


def test_host_is_client_of_another_host(pki):
    """A host certificate works on both ends (migration source and target)."""
    cerr, serr, _ = handshake(client_context(pki, "host-2"), server_context(pki, "host-1"), "host-1")
    assert cerr is None and serr is None


def test_wrong_server_name_fails_on_the_client(pki):
    cerr, _, _ = handshake(client_context(pki, "controller"), server_context(pki, "host-1"), "host-2")
    assert isinstance(cerr, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in cerr.verify_message


def test_pitfall_no_server_hostname_means_no_name_check(pki):
    """ssl.SSLObject (memory BIOs, what asyncio's TLS uses underneath) does not refuse a missing
    server_hostname even with check_hostname=True: the name check is then silently skipped.
    Callers must always pass the expected host name (httpx does: the URL host)."""
    cerr, serr, _ = handshake(client_context(pki, "controller"), server_context(pki, "host-1"), None)
    assert cerr is None and serr is None


def foreign_client(pki, other) -> ssl.SSLContext:
    """Trusts the fleet CA (so it accepts the server) but presents a certificate of another CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca/ca-cert.pem")
    ctx.load_cert_chain(other / "controllers/controller/cert.pem", other / "controllers/controller/key.pem")
    return ctx


def test_client_from_another_ca_is_refused(pki, other):
    _, serr, peer = handshake(foreign_client(pki, other), server_context(pki, "host-1"), "host-1")
    assert serr is not None and "certificate verify failed" in str(serr)
    assert peer is None


def test_client_without_certificate_is_refused(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca/ca-cert.pem")
    _, serr, peer = handshake(ctx, server_context(pki, "host-1"), "host-1")
    assert serr is not None and "certificate" in str(serr).lower()
    assert peer is None


def test_server_from_another_ca_is_refused(pki, other):
    cerr, _, _ = handshake(client_context(pki, "controller"), server_context(other, "host-1"), "host-1")
    assert isinstance(cerr, ssl.SSLCertVerificationError)


def test_contexts_are_strict(pki):
    s = server_context(pki, "host-1")
    c = client_context(pki, "controller")
    assert s.verify_mode == ssl.CERT_REQUIRED and c.verify_mode == ssl.CERT_REQUIRED
    assert c.check_hostname
    assert s.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_client_cert_cannot_serve(pki):
    with pytest.raises(PkiError, match="may not be used as a TLS server"):
        server_context(pki, "alice")
    assert client_context(pki, "alice").verify_mode == ssl.CERT_REQUIRED


def test_contexts_from_identity_and_uvicorn_kwargs(pki):
    ident = validate_identity(pki, "host-1", "host")
    assert server_context(ident).verify_mode == ssl.CERT_REQUIRED
    kw = uvicorn_ssl_kwargs(pki, "host-1", "host")
    assert kw == {"ssl_certfile": str(pki / "hosts/host-1/cert.pem"), "ssl_keyfile": str(pki / "hosts/host-1/key.pem"),
                  "ssl_ca_certs": str(pki / "ca/ca-cert.pem"), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert https_url("host-1") == "https://host-1"


def test_context_validates_first(pki):
    (pki / "hosts/host-1/key.pem").chmod(0o644)
    with pytest.raises(PkiError, match="chmod 600"):
        server_context(pki, "host-1")

"""`ssl.SSLContext`s for mutual TLS between fleet members (controller <-> agents).

Both sides present a certificate of the fleet CA and require one from the
peer. The client additionally checks that the server's certificate names the
host it meant to reach (the host name is always a DNS SAN of a fleet
certificate), so an agent cannot be impersonated by another fleet member.

Server (agent) with uvicorn - TCP or a unix socket, the same kwargs::

    ident = validate_identity(pki_dir, "host-1", "host", purpose="server")
    config = uvicorn.Config(app, uds="/run/ferry/agent.sock",     # or host=..., port=...
                            **uvicorn_ssl_kwargs(ident))
    # = ssl_certfile, ssl_keyfile, ssl_ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED

Client (controller) with httpx over a unix socket::

    ctx = client_context(pki_dir, "controller", "controller")
    transport = httpx.AsyncHTTPTransport(uds="/run/ferry/agent.sock", verify=ctx)
    async with httpx.AsyncClient(transport=transport, base_url="https://host-1") as c:
        await c.get("/v1/health")

The URL's host (``host-1``) is never resolved - the transport connects to the
socket - but httpcore still uses it as the TLS server_hostname: it is sent as
SNI and `ssl` checks it against the server certificate's SANs. So
``base_url=https://<expected host name>`` is how a caller says which host it
expects behind a socket (verified by tests/e2e/test_pki_tls.py against uvicorn
serving TLS on a unix socket). Over TCP use the host's address in the URL and
name the expected host with the request extension
``extensions={"sni_hostname": "host-1"}`` (httpcore then checks that name
instead of the address), or put the address in the certificate as an IP SAN.

Notes:

- `verify=ctx` must be given to the *transport* when a transport is passed;
  `AsyncClient(verify=...)` is ignored then.
- uvicorn does not put the peer certificate in the ASGI scope, so an agent
  cannot tell which fleet member called it; every holder of a fleet
  certificate (host, controller, client) is accepted. Authorisation by name
  needs a front that inspects `ssl_object.getpeercert()` (not provided here).
"""
from __future__ import annotations

import ssl
from pathlib import Path

from ferry.pki.ca import IssuedPaths
from ferry.pki.validate import Identity, Purpose, validate_identity

__all__ = ["server_context", "client_context", "uvicorn_ssl_kwargs", "https_url"]


def _identity(source: Path | IssuedPaths | Identity, name: str | None, kind: str | None,
              purpose: Purpose) -> Identity:
    if isinstance(source, Identity):
        return source
    return validate_identity(source, name, kind, purpose=purpose)


def _base(ctx: ssl.SSLContext, ident: Identity) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=str(ident.ca_cert))
    ctx.load_cert_chain(certfile=str(ident.cert), keyfile=str(ident.key))
    return ctx


def server_context(source: Path | IssuedPaths | Identity, name: str | None = None,
                   kind: str | None = None) -> ssl.SSLContext:
    """A TLS server context presenting `name`'s certificate and requiring a fleet client certificate.

    `source` is a PKI folder (with `name`, and `kind` if ambiguous), an
    `IssuedPaths` or an already validated `Identity`.
    """
    ident = _identity(source, name, kind, "server")
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ident)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(source: Path | IssuedPaths | Identity, name: str | None = None,
                   kind: str | None = None) -> ssl.SSLContext:
    """A TLS client context presenting `name`'s certificate, trusting only the fleet CA.

    Host names are checked (`check_hostname`): the caller names the expected
    server as the URL host / `server_hostname` (see the module docstring).
    """
    ident = _identity(source, name, kind, "client")
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ident)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    return ctx


def uvicorn_ssl_kwargs(source: Path | IssuedPaths | Identity, name: str | None = None,
                       kind: str | None = None) -> dict:
    """`uvicorn.Config` keyword arguments for a mutual-TLS server (any fleet client cert)."""
    ident = _identity(source, name, kind, "server")
    return {
        "ssl_certfile": str(ident.cert),
        "ssl_keyfile": str(ident.key),
        "ssl_ca_certs": str(ident.ca_cert),
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
    }


def https_url(host: str) -> str:
    """The base URL that makes httpx (over a unix-socket transport) check the peer is `host`."""
    return f"https://{host}"

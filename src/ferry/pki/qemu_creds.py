"""TLS credentials for QEMU migration streams (`tls-creds-x509`, `authz-simple`).

QEMU's `tls-creds-x509` object reads a folder with fixed file names::

    ca-cert.pem        the fleet CA
    server-cert.pem    this host's certificate   (endpoint=server: migration target)
    server-key.pem     this host's key (0600)
    client-cert.pem    the same certificate      (endpoint=client: migration source)
    client-key.pem     the same key (0600)

A host is both a migration source and a target, so its one certificate (EKU
serverAuth + clientAuth) serves both roles; `qemu_creds_dir` lays the folder out.

Wiring a migration (all QMP; verified by tests/e2e/test_pki_tls.py on QEMU 7.2):

target::

    object-add  {"qom-type": "tls-creds-x509", "id": "mig-tls", "dir": DIR,
                 "endpoint": "server", "verify-peer": true}
    object-add  {"qom-type": "authz-simple", "id": "mig-authz",
                 "identity": dn_for(<source host cert>)}        # only that source may connect
    migrate-set-parameters {"tls-creds": "mig-tls", "tls-authz": "mig-authz"}
    migrate-incoming {"uri": "tcp:ADDR:PORT"}

source::

    object-add  {"qom-type": "tls-creds-x509", "id": "mig-tls", "dir": DIR,
                 "endpoint": "client", "verify-peer": true}
    migrate-set-parameters {"tls-creds": "mig-tls", "tls-hostname": "<target host name>"}
    migrate {"uri": "tcp:ADDR:PORT"}

`tls-hostname` is checked against the target certificate's SANs (the host name
is always a DNS SAN); without it QEMU checks the address from the URI, which
then must be an IP SAN of the target's certificate.

QEMU reads the folder when the object is created; after re-issuing a
certificate, delete and re-create the object (or use a new id).
"""
from __future__ import annotations

from pathlib import Path

from ferry.pki._files import DIR_MODE, write_cert, write_key
from ferry.pki._x509 import load_cert, qemu_dn
from ferry.pki.ca import IssuedPaths
from ferry.pki.validate import Identity, validate_identity

__all__ = ["qemu_creds_dir", "dn_for", "QEMU_CREDS_FILES"]

QEMU_CREDS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


def qemu_creds_dir(pki_dir: Path | IssuedPaths | Identity, host: str | None, dest: Path) -> Path:
    """Write QEMU's credential folder for `host` into `dest` and return `dest`.

    The identity is validated first (a bad certificate fails here with one
    line, not in QEMU). Keys are written 0600 from creation; existing files in
    `dest` are replaced atomically.
    """
    if isinstance(pki_dir, Identity):
        ident = pki_dir
    else:
        ident = validate_identity(pki_dir, host, None if isinstance(pki_dir, IssuedPaths) else "host")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    cert = ident.cert.read_bytes()
    key = ident.key.read_bytes()
    write_cert(dest / "ca-cert.pem", ident.ca_cert.read_bytes())
    for role in ("server", "client"):
        write_key(dest / f"{role}-key.pem", key)
        write_cert(dest / f"{role}-cert.pem", cert)
    return dest


def dn_for(cert_path: Path) -> str:
    """The subject DN of `cert_path` as QEMU's `authz-simple` identity must be written.

    QEMU 7.2 compares (exact string match) the peer DN as GnuTLS prints it:
    the RDNs in the order they appear in the certificate, comma-separated,
    without spaces, e.g. ``C=XX,O=ferry,CN=host-1``. The RFC 4514 (reversed)
    form ``CN=host-1,O=ferry,C=XX`` is DENIED.
    """
    return qemu_dn(load_cert(Path(cert_path)).subject)


def expected_dn(ca_cert: Path, host: str) -> str:
    """The DN a fleet host's certificate carries, derived from the fleet CA and the host's name.

    The controller names the source this way for the target's tls-authz, never from what
    the source host reports about itself: a host cannot vouch for its own identity.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from ferry.pki._x509 import load_cert, qemu_dn

    ca = load_cert(Path(ca_cert), "fleet CA certificate").subject

    def attr(oid, default: str) -> str:
        values = ca.get_attributes_for_oid(oid)
        return str(values[0].value) if values else default

    return qemu_dn(x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, attr(NameOID.COUNTRY_NAME, "XX")),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, attr(NameOID.ORGANIZATION_NAME, "ferry")),
        x509.NameAttribute(NameOID.COMMON_NAME, host),
    ]))

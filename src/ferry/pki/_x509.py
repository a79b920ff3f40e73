"""Small helpers over `cryptography.x509` shared by the modules of `ferry.pki`."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ferry.pki.errors import PkiError

# Short names GnuTLS prints for the attributes it knows (lib/x509/common.c).
_SHORT_NAMES = {
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
}


def fmt_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def load_cert(path: Path, what: str = "certificate") -> x509.Certificate:
    data = Path(path).read_bytes()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{what} {path} is not a PEM certificate") from None


def load_key(path: Path):
    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except TypeError:
        raise PkiError(f"key {path} is encrypted with a passphrase; ferry needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"key {path} is not a PEM private key") from None


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _escape(value: str) -> str:
    """RFC 4514 escaping of one attribute value (as GnuTLS does)."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (i == 0 and ch in "# ") or (i == len(value) - 1 and ch == " "):
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def qemu_dn(name: x509.Name) -> str:
    """The subject as QEMU 7.2 (GnuTLS 3.7) prints it for tls-authz: RDNs in certificate order.

    E.g. ``C=XX,O=ferry,CN=host-1`` - note this is NOT RFC 4514 order (which
    reverses the RDNs, ``CN=host-1,O=ferry,C=XX``, as `x509.Name.rfc4514_string()`
    gives). Verified against QEMU 7.2.22 / GnuTLS 3.7.9 by tests/e2e/test_pki_tls.py.
    """
    rdns = []
    for rdn in name.rdns:
        parts = []
        for attr in rdn:
            short = _SHORT_NAMES.get(attr.oid)
            if short is None:
                raise PkiError(f"subject attribute {attr.oid.dotted_string} has no known QEMU/GnuTLS "
                               "string form; ferry certificates use only C, O and CN")
            parts.append(f"{short}={_escape(str(attr.value))}")
        rdns.append("+".join(parts))
    return ",".join(rdns)


def common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None

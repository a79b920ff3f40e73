"""Start-up checks of a TLS identity, each failure one clear line (`PkiError`).

An agent or the controller calls `validate_identity` before it serves or
connects, so a bad certificate stops it at start with a message that names the
file and the problem, instead of a TLS handshake failure later on the wire.

Checked, in this order (the first problem found is reported):

1. the certificate, key and fleet CA files exist;
2. the CA file is a CA certificate (basicConstraints CA:TRUE) and is valid now;
3. the certificate is valid now (expired / not yet valid, with both dates and
   the current time), is not itself a CA, is signed by the fleet CA, carries
   the expected name (CN) and, if asked, the TLS purpose (serverAuth/clientAuth);
4. the key file is not accessible by group or others: this REFUSES (it does not
   just warn) - a fleet key readable by other users lets them impersonate the
   host, and the fix is one `chmod 600`;
5. the key is readable and matches the certificate.
"""
from __future__ import annotations

import datetime as dt
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.pki._x509 import common_name, fmt_time, load_cert, load_key, qemu_dn, spki
from ferry.pki.ca import IssuedPaths, ca_paths, find_identity
from ferry.pki.errors import PkiError

__all__ = ["Identity", "PkiError", "validate_identity", "validate_ca", "check_key_permissions"]

Purpose = Literal["server", "client"]
_PURPOSE_OID = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


@dataclass(frozen=True)
class Identity:
    """A checked TLS identity: the files to hand to `ssl`/uvicorn/QEMU and what they say."""

    name: str              # the certificate's CN (= its DNS SAN, the host name peers check)
    kind: str | None       # host | controller | client, when known from the PKI layout
    cert: Path
    key: Path
    ca_cert: Path
    subject: str           # the DN as QEMU's authz-simple wants it, e.g. "C=XX,O=ferry,CN=host-1"
    fleet: str | None      # the O of the subject
    not_before: dt.datetime
    not_after: dt.datetime
    sans: tuple[str, ...]  # "DNS:host-1", "IP:10.201.1.2", ...


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _check_dates(cert: x509.Certificate, path: Path, what: str, now: dt.datetime) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        raise PkiError(f"{what} {path} is not yet valid: valid from {fmt_time(start)} until {fmt_time(end)}, "
                       f"now is {fmt_time(now)} (check this machine's clock)")
    if now > end:
        raise PkiError(f"{what} {path} has expired: valid from {fmt_time(start)} until {fmt_time(end)}, "
                       f"now is {fmt_time(now)} (issue a new one)")


def _is_ca(cert: x509.Certificate) -> bool | None:
    """True/False from basicConstraints, None if the extension is missing."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return None


def validate_ca(ca_cert: Path, now: dt.datetime | None = None) -> x509.Certificate:
    """Check that `ca_cert` exists, is a CA certificate and is valid now; return it."""
    ca_cert = Path(ca_cert)
    now = now or _now()
    if not ca_cert.is_file():
        raise PkiError(f"missing fleet CA certificate {ca_cert}")
    ca = load_cert(ca_cert, "fleet CA certificate")
    is_ca = _is_ca(ca)
    if is_ca is None:
        raise PkiError(f"{ca_cert} is not a CA certificate (no basicConstraints extension)")
    if not is_ca:
        raise PkiError(f"{ca_cert} is not a CA certificate (basicConstraints CA:FALSE)")
    _check_dates(ca, ca_cert, "fleet CA certificate", now)
    return ca


def check_key_permissions(key: Path) -> None:
    """Refuse a key file that group or others may access (any of mode 0o077)."""
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode & 0o077:
        raise PkiError(f"key {key} is accessible by group/others (mode {mode:04o}); "
                       f"run `chmod 600 {key}`")


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out = [f"DNS:{v}" for v in san.get_values_for_type(x509.DNSName)]
    out += [f"IP:{v}" for v in san.get_values_for_type(x509.IPAddress)]
    return tuple(out)


def _check_purpose(cert: x509.Certificate, path: Path, purpose: Purpose) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no EKU = any purpose
    if _PURPOSE_OID[purpose] not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise PkiError(f"certificate {path} may not be used as a TLS {purpose} "
                       f"(its extendedKeyUsage lacks {purpose}Auth); issue it as a host or controller")


def validate_identity(source: Path | IssuedPaths | None = None, name: str | None = None,
                      kind: str | None = None, *, cert: Path | None = None, key: Path | None = None,
                      ca_cert: Path | None = None, purpose: Purpose | None = None,
                      now: dt.datetime | None = None) -> Identity:
    """Check one identity and return it; raise `PkiError` (one line) on the first problem.

    `source` is a PKI folder (then `name`, and `kind` unless unambiguous, select
    `<source>/<kind>s/<name>/`) or an `IssuedPaths`. Explicit `cert`, `key`,
    `ca_cert` paths override the layout (then `source` may be None; `name`,
    if given, must equal the certificate's CN).
    """
    paths: IssuedPaths | None = None
    if isinstance(source, IssuedPaths):
        paths = source
    elif source is not None and (cert is None or key is None):
        if name is None:
            raise PkiError("validate_identity needs the identity's name to find it in the PKI folder")
        paths = find_identity(Path(source), name, kind)
    cert_p = Path(cert) if cert is not None else (paths.cert if paths else None)
    key_p = Path(key) if key is not None else (paths.key if paths else None)
    if ca_cert is not None:
        ca_p = Path(ca_cert)
    elif paths is not None:
        ca_p = paths.ca_cert
    elif source is not None and not isinstance(source, IssuedPaths):
        ca_p = ca_paths(Path(source)).cert
    else:
        ca_p = None
    if cert_p is None or key_p is None or ca_p is None:
        raise PkiError("validate_identity needs a PKI folder or explicit cert, key and ca_cert paths")
    now = now or _now()

    missing = [f"{what} {p}" for what, p in (("certificate", cert_p), ("key", key_p), ("fleet CA certificate", ca_p))
               if not p.is_file()]
    if missing:
        raise PkiError(f"missing TLS file{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")

    ca = validate_ca(ca_p, now)
    crt = load_cert(cert_p)
    _check_dates(crt, cert_p, "certificate", now)
    if _is_ca(crt):
        raise PkiError(f"certificate {cert_p} is a CA certificate, not a host/controller/client certificate")
    try:
        crt.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"certificate {cert_p} (issuer {qemu_dn_or_rfc(crt.issuer)}) is not signed by the fleet CA "
                       f"{ca_p} ({qemu_dn_or_rfc(ca.subject)})") from None
    cn = common_name(crt.subject)
    if name is not None and cn != name:
        raise PkiError(f"certificate {cert_p} is for {cn!r}, not {name!r}")
    if purpose is not None:
        _check_purpose(crt, cert_p, purpose)

    check_key_permissions(key_p)
    k = load_key(key_p)
    if spki(k.public_key()) != spki(crt.public_key()):
        raise PkiError(f"key {key_p} does not match certificate {cert_p} (they are from different issues; "
                       "re-issue or copy the matching pair)")

    org = crt.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return Identity(
        name=cn or "",
        kind=paths.kind if paths else kind,
        cert=cert_p, key=key_p, ca_cert=ca_p,
        subject=qemu_dn_or_rfc(crt.subject),
        fleet=str(org[0].value) if org else None,
        not_before=crt.not_valid_before_utc, not_after=crt.not_valid_after_utc,
        sans=_sans(crt),
    )


def qemu_dn_or_rfc(name: x509.Name) -> str:
    try:
        return qemu_dn(name)
    except PkiError:
        return name.rfc4514_string()

"""The fleet CA and the certificates it issues (library `cryptography`, no openssl CLI).

Layout of a PKI folder::

    <pki_dir>/ca/ca-cert.pem              the fleet CA (0644)
    <pki_dir>/ca/ca-key.pem               its key (0600) - only the machine that issues needs it
    <pki_dir>/<kind>s/<name>/cert.pem     a host, controller or client certificate (0644)
    <pki_dir>/<kind>s/<name>/key.pem      its key (0600)

Keys are ECDSA P-256 by default (accepted by GnuTLS, i.e. QEMU, and OpenSSL, i.e.
Python's `ssl`); RSA 2048 on request (`key_type="rsa"`).

Certificates issued here:

- subject is exactly ``C=<country>, O=<fleet>, CN=<name>`` (three RDNs; QEMU's
  `authz-simple` compares the subject as a string, see `qemu_creds.dn_for`);
- SAN is ``DNS:<name>`` plus the given SANs (IP addresses become IP SANs);
- key usage is digitalSignature for EC keys (RFC 8813 forbids keyEncipherment
  with ECDSA), digitalSignature + keyEncipherment for RSA keys. For EC keys the
  extension is NOT marked critical: QEMU before 7.2.22 (stable backport of
  upstream 3995fc238e, "crypto: stop requiring key encipherment usage")
  refuses to load a certificate whose *critical* key usage lacks
  keyEncipherment, and only ignores the bit when the extension is not critical.
  OpenSSL (Python `ssl`) and GnuTLS enforce key usage either way;
- extended key usage: serverAuth + clientAuth for hosts (a host is a migration
  source = TLS client, a migration target = TLS server, and an agent = HTTPS
  server) and for controllers (client of the agents, server of the API);
  clientAuth only for clients (people and tools);
- basicConstraints CA:FALSE (critical), subject and authority key identifiers.

Certificates start 5 minutes in the past (clock skew between hosts) and never
outlive the CA (their end is capped at the CA's).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.pki._files import write_cert, write_key
from ferry.pki.errors import PkiError

Kind = Literal["host", "controller", "client"]
KeyType = Literal["ec", "rsa"]
KINDS: tuple[str, ...] = ("host", "controller", "client")
DEFAULT_COUNTRY = "XX"
CLOCK_SKEW = dt.timedelta(minutes=5)

# A name is a file name, a DNS SAN and part of a DN QEMU compares as a string:
# keep it to characters that need no escaping anywhere.
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})$")
_FLEET_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})$")
_DNS_RE = re.compile(r"^(?=.{1,253}$)(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class CaPaths:
    dir: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class IssuedPaths:
    """Where one identity's files are; `ca_cert` is the fleet CA that signed it."""

    name: str
    kind: str
    dir: Path
    cert: Path
    key: Path
    ca_cert: Path


def ca_paths(pki_dir: Path) -> CaPaths:
    d = Path(pki_dir) / "ca"
    return CaPaths(dir=d, cert=d / "ca-cert.pem", key=d / "ca-key.pem")


def identity_paths(pki_dir: Path, name: str, kind: str) -> IssuedPaths:
    check_kind(kind)
    d = Path(pki_dir) / f"{kind}s" / name
    return IssuedPaths(name=name, kind=kind, dir=d, cert=d / "cert.pem", key=d / "key.pem",
                       ca_cert=ca_paths(pki_dir).cert)


def find_identity(pki_dir: Path, name: str, kind: str | None = None) -> IssuedPaths:
    """The paths of `name`; without `kind`, the one kind folder that holds `name`."""
    if kind is not None:
        return identity_paths(pki_dir, name, kind)
    found = [identity_paths(pki_dir, name, k) for k in KINDS
             if (Path(pki_dir) / f"{k}s" / name).is_dir()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise PkiError(f"no certificate for {name!r} in {pki_dir} "
                       f"(issue one with `ferry pki issue {name} --kind host|controller|client`)")
    raise PkiError(f"{name!r} exists as more than one kind in {pki_dir} "
                   f"({', '.join(p.kind for p in found)}); say which kind")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PkiError(f"unknown certificate kind {kind!r}; use one of {', '.join(KINDS)}")


def check_name(name: str, what: str = "name") -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PkiError(f"invalid {what} {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _new_key(key_type: str):
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise PkiError(f"unknown key type {key_type!r}; use 'ec' (P-256) or 'rsa' (2048 bit)")


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(country: str, org: str, cn: str) -> x509.Name:
    # Order matters: C, O, CN, as written in the certificate.
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, country),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _check_country(country: str) -> None:
    if not (isinstance(country, str) and len(country) == 2 and country.isascii() and country.isalpha()):
        raise PkiError(f"invalid country {country!r}: use a two-letter code such as {DEFAULT_COUNTRY!r}")


def init_ca(pki_dir: Path, fleet: str = "ferry", days: int = 3650, *, force: bool = False,
            country: str = DEFAULT_COUNTRY, key_type: KeyType = "ec") -> CaPaths:
    """Create the fleet CA in `<pki_dir>/ca`; refuse to replace an existing one unless `force`.

    Replacing the CA invalidates every certificate the old one issued.
    """
    check_name(fleet, "fleet name")
    _check_country(country)
    if days < 1:
        raise PkiError(f"invalid CA lifetime {days} days: must be at least 1")
    paths = ca_paths(pki_dir)
    existing = [p for p in (paths.cert, paths.key) if p.exists()]
    if existing and not force:
        raise PkiError(f"a fleet CA already exists at {paths.dir}; refusing to replace it "
                       "(use force to replace it - every certificate it issued stops being trusted)")
    key = _new_key(key_type)
    subject = _name(country, fleet, f"{fleet} fleet CA")
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=True, crl_sign=True, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    paths.dir.mkdir(parents=True, exist_ok=True)
    write_key(paths.key, _key_pem(key))
    write_cert(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths


def parse_sans(sans: Iterable[str]) -> list[x509.GeneralName]:
    """Plain strings to SANs: an IP address (v4/v6) becomes an IP SAN, anything else a DNS SAN.

    An explicit ``IP:`` or ``DNS:`` prefix is accepted too.
    """
    out: list[x509.GeneralName] = []
    for raw in sans:
        s = str(raw).strip()
        prefix, _, rest = s.partition(":")
        if prefix.upper() in ("IP", "DNS") and rest and not _looks_like_ipv6(s):
            kind, value = prefix.upper(), rest.strip()
        else:
            kind, value = "", s
        if kind in ("", "IP"):
            try:
                out.append(x509.IPAddress(ipaddress.ip_address(value)))
                continue
            except ValueError:
                if kind == "IP":
                    raise PkiError(f"invalid IP address in SAN {raw!r}") from None
        if not _DNS_RE.match(value):
            raise PkiError(f"invalid SAN {raw!r}: not an IP address or a DNS name")
        out.append(x509.DNSName(value.lower() if value.isascii() else value))
    return out


def _looks_like_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
        return True
    except ValueError:
        return False


def _load_ca(pki_dir: Path):
    paths = ca_paths(pki_dir)
    for p in (paths.cert, paths.key):
        if not p.is_file():
            raise PkiError(f"fleet CA file {p} is missing (create the CA with `ferry pki init`)")
    try:
        ca_cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    except ValueError as e:
        raise PkiError(f"fleet CA certificate {paths.cert} is not a PEM certificate: {e}") from None
    try:
        ca_key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"fleet CA key {paths.key} cannot be read: {e}") from None
    if ca_key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo) != \
            ca_cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
        raise PkiError(f"fleet CA key {paths.key} does not match the CA certificate {paths.cert}")
    return ca_cert, ca_key


def _attr(name: x509.Name, oid) -> str | None:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


def issue(pki_dir: Path, name: str, kind: Kind, days: int = 825, sans: Iterable[str] = (), *,
          force: bool = False, key_type: KeyType = "ec", country: str | None = None,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> IssuedPaths:
    """Issue a key and certificate for `name` signed by the fleet CA in `pki_dir`.

    The organisation (fleet) and, unless given, the country are the CA's.
    `not_before`/`not_after` override the validity window (for tests and
    rotation drills); otherwise it is [now - 5 min, now + days], capped at the
    CA's end. Refuses to replace an existing certificate unless `force`.
    """
    check_name(name)
    check_kind(kind)
    sans = [sans] if isinstance(sans, str) else list(sans)
    extra = parse_sans(sans)
    paths = identity_paths(pki_dir, name, kind)
    if (paths.cert.exists() or paths.key.exists()) and not force:
        raise PkiError(f"{kind} {name!r} already has a certificate in {paths.dir}; "
                       "refusing to replace it (use force to re-issue)")
    ca_cert, ca_key = _load_ca(pki_dir)
    fleet = _attr(ca_cert.subject, NameOID.ORGANIZATION_NAME) or "ferry"
    country = country or _attr(ca_cert.subject, NameOID.COUNTRY_NAME) or DEFAULT_COUNTRY
    _check_country(country)

    now = _now()
    start = not_before or now - CLOCK_SKEW
    end = not_after or min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if start.tzinfo is None or end.tzinfo is None:
        raise PkiError("not_before/not_after must be timezone-aware datetimes")
    if end <= start:
        raise PkiError(f"certificate would end ({end:%Y-%m-%d %H:%M:%S %Z}) before it starts "
                       f"({start:%Y-%m-%d %H:%M:%S %Z})")

    san_names: list[x509.GeneralName] = [x509.DNSName(name.lower())]
    for g in extra:
        if g not in san_names:
            san_names.append(g)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind == "client":
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]

    key = _new_key(key_type)
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(country, fleet, name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=is_rsa, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=False, crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=is_rsa)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(san_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths.dir.mkdir(parents=True, exist_ok=True)
    write_key(paths.key, _key_pem(key))
    write_cert(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths

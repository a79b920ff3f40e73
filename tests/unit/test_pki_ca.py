"""ferry.pki.ca: the fleet CA and the certificates it issues."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.pki import PkiError, init_ca, issue
from ferry.pki.ca import ca_paths, find_identity, parse_sans
from ferry.pki.cli import pki_check, pki_init, pki_issue


def load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


def test_init_ca_layout_modes_and_extensions(tmp_path):
    paths = init_ca(tmp_path, fleet="acme", days=100)
    assert paths.cert == tmp_path / "ca" / "ca-cert.pem"
    assert paths.key == tmp_path / "ca" / "ca-key.pem"
    assert mode(paths.key) == 0o600
    assert mode(paths.cert) == 0o644
    ca = load(paths.cert)
    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    bc = ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ext(ca, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    life = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=100) <= life <= dt.timedelta(days=100, minutes=6)


def test_init_ca_refuses_to_overwrite_unless_forced(tmp_path):
    first = init_ca(tmp_path)
    old = first.cert.read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        init_ca(tmp_path)
    assert first.cert.read_bytes() == old
    init_ca(tmp_path, force=True)
    assert first.cert.read_bytes() != old
    assert mode(first.key) == 0o600


def test_init_ca_refuses_if_only_the_key_is_left(tmp_path):
    paths = init_ca(tmp_path)
    paths.cert.unlink()
    with pytest.raises(PkiError, match="already exists"):
        init_ca(tmp_path)


@pytest.mark.parametrize("fleet", ["", "a,b", "x y", "-lead", "o=evil"])
def test_init_ca_rejects_bad_fleet_names(tmp_path, fleet):
    with pytest.raises(PkiError, match="fleet name"):
        init_ca(tmp_path, fleet=fleet)


def test_rsa_ca(tmp_path):
    paths = init_ca(tmp_path, key_type="rsa")
    key = load(paths.cert).public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048


def test_issue_host(tmp_path):
    init_ca(tmp_path, fleet="acme")
    p = issue(tmp_path, "host-1", "host", sans=["10.201.1.2", "host-1.lab", "fd00::2"])
    assert p.cert == tmp_path / "hosts" / "host-1" / "cert.pem"
    assert p.key == tmp_path / "hosts" / "host-1" / "key.pem"
    assert p.ca_cert == ca_paths(tmp_path).cert
    assert mode(p.key) == 0o600 and mode(p.cert) == 0o644
    cert = load(p.cert)
    # exactly C, O, CN in this order (QEMU's authz matches the DN string in this order)
    assert [(a.oid, a.value) for a in cert.subject] == [
        (NameOID.COUNTRY_NAME, "XX"), (NameOID.ORGANIZATION_NAME, "acme"), (NameOID.COMMON_NAME, "host-1")]
    assert len(cert.subject.rdns) == 3
    assert cert.issuer == load(p.ca_cert).subject
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host-1", "host-1.lab"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.201.1.2"),
                                                      ipaddress.ip_address("fd00::2")]
    eku = ext(cert, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = ext(cert, x509.KeyUsage)
    assert ku.value.digital_signature and not ku.value.key_encipherment and not ku.value.key_cert_sign
    assert not ku.critical  # EC: see ca.py (older QEMU rejects critical KU without keyEncipherment)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    cert.verify_directly_issued_by(load(p.ca_cert))
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(load(p.ca_cert), x509.SubjectKeyIdentifier).value.digest


def test_issue_rsa_leaf_has_key_encipherment(tmp_path):
    init_ca(tmp_path)
    cert = load(issue(tmp_path, "host-2", "host", key_type="rsa").cert)
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)


@pytest.mark.parametrize("kind, usages", [
    ("controller", {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
    ("client", {ExtendedKeyUsageOID.CLIENT_AUTH}),
])
def test_issue_controller_and_client(tmp_path, kind, usages):
    init_ca(tmp_path)
    p = issue(tmp_path, "alice", kind)
    assert p.cert == tmp_path / f"{kind}s" / "alice" / "cert.pem"
    assert set(ext(load(p.cert), x509.ExtendedKeyUsage).value) == usages


def test_issue_refuses_to_overwrite_unless_forced(tmp_path):
    init_ca(tmp_path)
    p = issue(tmp_path, "host-1", "host")
    old = p.cert.read_bytes()
    with pytest.raises(PkiError, match="already has a certificate"):
        issue(tmp_path, "host-1", "host")
    issue(tmp_path, "host-1", "host", force=True)
    assert p.cert.read_bytes() != old and mode(p.key) == 0o600


def test_issue_without_ca(tmp_path):
    with pytest.raises(PkiError, match="ferry pki init"):
        issue(tmp_path, "host-1", "host")


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a,b", "-x", "CN=x", "x" * 64])
def test_issue_rejects_bad_names(tmp_path, name):
    init_ca(tmp_path)
    with pytest.raises(PkiError, match="invalid name"):
        issue(tmp_path, name, "host")


def test_issue_rejects_bad_kind_and_sans(tmp_path):
    init_ca(tmp_path)
    with pytest.raises(PkiError, match="unknown certificate kind"):
        issue(tmp_path, "x", "server")  # type: ignore[arg-type]
    with pytest.raises(PkiError, match="invalid SAN"):
        issue(tmp_path, "x", "host", sans=["not a name"])
    with pytest.raises(PkiError, match="invalid IP"):
        issue(tmp_path, "x", "host", sans=["IP:host-1"])
    assert not (tmp_path / "hosts" / "x").exists()


def test_parse_sans():
    got = parse_sans(["10.0.0.1", "IP:10.0.0.2", "DNS:a.example", "b", "::1", "fe80::1", "IP:::2"])
    assert got == [x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                   x509.IPAddress(ipaddress.ip_address("10.0.0.2")),
                   x509.DNSName("a.example"), x509.DNSName("b"),
                   x509.IPAddress(ipaddress.ip_address("::1")),
                   x509.IPAddress(ipaddress.ip_address("fe80::1")),
                   x509.IPAddress(ipaddress.ip_address("::2"))]


def test_issue_validity_defaults_and_overrides(tmp_path):
    init_ca(tmp_path, days=30)
    cert = load(issue(tmp_path, "h1", "host", days=825).cert)
    ca = load(ca_paths(tmp_path).cert)
    assert cert.not_valid_after_utc == ca.not_valid_after_utc  # capped at the CA's end
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    end = dt.datetime(2020, 2, 1, tzinfo=dt.timezone.utc)
    cert = load(issue(tmp_path, "h2", "host", not_before=start, not_after=end).cert)
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (start, end)
    with pytest.raises(PkiError, match="before it starts"):
        issue(tmp_path, "h3", "host", not_before=end, not_after=start)
    with pytest.raises(PkiError, match="timezone"):
        issue(tmp_path, "h4", "host", not_after=dt.datetime(2030, 1, 1))


def test_keys_are_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        p = init_ca(tmp_path)
        i = issue(tmp_path, "h1", "host")
    finally:
        os.umask(old)
    assert mode(p.key) == 0o600 and mode(i.key) == 0o600
    assert mode(p.cert) == 0o644 and mode(i.cert) == 0o644


def test_key_file_is_created_0600_not_chmodded(tmp_path, monkeypatch):
    """The key is never on disk with a wider mode: no chmod after writing, os.open with 0o600."""
    calls = []
    real_open = os.open
    monkeypatch.setattr(os, "chmod", lambda *a, **k: calls.append(("chmod", a)))

    def spy_open(path, flags, mode=0o777, *a, **k):
        calls.append(("open", str(path), mode))
        return real_open(path, flags, mode, *a, **k)

    monkeypatch.setattr(os, "open", spy_open)
    init_ca(tmp_path)
    assert not [c for c in calls if c[0] == "chmod"]
    key_opens = [c for c in calls if c[0] == "open" and "ca-key.pem" in c[1]]
    assert key_opens and all(m == 0o600 for _, _, m in key_opens)


def test_find_identity(tmp_path):
    init_ca(tmp_path)
    issue(tmp_path, "h1", "host")
    issue(tmp_path, "ctl", "controller")
    assert find_identity(tmp_path, "h1").kind == "host"
    assert find_identity(tmp_path, "ctl").kind == "controller"
    with pytest.raises(PkiError, match="no certificate for 'nope'"):
        find_identity(tmp_path, "nope")
    issue(tmp_path, "h1", "client")
    with pytest.raises(PkiError, match="more than one kind"):
        find_identity(tmp_path, "h1")


def test_cli_functions(tmp_path):
    ca = pki_init(tmp_path, "fleet1", False)
    assert ca.cert.is_file()
    with pytest.raises(PkiError):
        pki_init(tmp_path, "fleet1", False)
    p = pki_issue(tmp_path, "host-3", "host", ["10.201.3.2"])
    assert p.cert.is_file() and p.key.is_file()
    ident = pki_check(tmp_path, "host-3")
    assert ident.subject == "C=XX,O=fleet1,CN=host-3"
    assert "IP:10.201.3.2" in ident.sans

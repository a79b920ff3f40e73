"""ferry.pki.qemu_creds: QEMU's credential folder and authz identity strings."""
from __future__ import annotations

import datetime as dt
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ferry.pki import PkiError, dn_for, init_ca, issue, qemu_creds_dir, validate_identity
from ferry.pki.qemu_creds import QEMU_CREDS_FILES


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    init_ca(d)
    issue(d, "host-1", "host")
    return d


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_creds_dir_layout(pki, tmp_path):
    dest = qemu_creds_dir(pki, "host-1", tmp_path / "creds")
    assert dest == tmp_path / "creds"
    assert sorted(os.listdir(dest)) == sorted(QEMU_CREDS_FILES)
    host = pki / "hosts/host-1"
    assert (dest / "ca-cert.pem").read_bytes() == (pki / "ca/ca-cert.pem").read_bytes()
    for role in ("server", "client"):
        assert (dest / f"{role}-cert.pem").read_bytes() == (host / "cert.pem").read_bytes()
        assert (dest / f"{role}-key.pem").read_bytes() == (host / "key.pem").read_bytes()
        assert mode(dest / f"{role}-key.pem") == 0o600
        assert mode(dest / f"{role}-cert.pem") == 0o644
    assert mode(dest / "ca-cert.pem") == 0o644


def test_creds_dir_refreshes_after_reissue(pki, tmp_path):
    dest = qemu_creds_dir(pki, "host-1", tmp_path / "creds")
    old = (dest / "server-cert.pem").read_bytes()
    issue(pki, "host-1", "host", force=True)
    qemu_creds_dir(pki, "host-1", dest)
    assert (dest / "server-cert.pem").read_bytes() != old
    assert mode(dest / "server-key.pem") == 0o600


def test_creds_dir_validates_first(pki, tmp_path):
    (pki / "hosts/host-1/key.pem").unlink()
    with pytest.raises(PkiError, match="missing TLS file: key"):
        qemu_creds_dir(pki, "host-1", tmp_path / "creds")
    assert not (tmp_path / "creds").exists()


def test_creds_dir_from_identity(pki, tmp_path):
    ident = validate_identity(pki, "host-1", "host")
    dest = qemu_creds_dir(ident, None, tmp_path / "c2")
    assert (dest / "client-cert.pem").read_bytes() == ident.cert.read_bytes()


def test_dn_for_is_certificate_order(pki):
    dn = dn_for(pki / "hosts/host-1/cert.pem")
    assert dn == "C=XX,O=ferry,CN=host-1"
    cert = x509.load_pem_x509_certificate((pki / "hosts/host-1/cert.pem").read_bytes())
    # NOT the RFC 4514 string (reversed), which QEMU 7.2 denies
    assert cert.subject.rfc4514_string() == "CN=host-1,O=ferry,C=XX" != dn


def _cert_with(tmp_path, attrs):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(attrs)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    p = tmp_path / "c.pem"
    p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return p


def test_dn_for_escapes_and_keeps_order(tmp_path):
    p = _cert_with(tmp_path, [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "a,b+c"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, " x "),
        x509.NameAttribute(NameOID.COMMON_NAME, "#h=1"),
    ])
    assert dn_for(p) == r"C=DE,O=a\,b\+c,OU=\ x\ ,CN=\#h\=1"


def test_dn_for_refuses_unknown_attributes(tmp_path):
    p = _cert_with(tmp_path, [x509.NameAttribute(NameOID.SERIAL_NUMBER, "1"),
                              x509.NameAttribute(NameOID.COMMON_NAME, "h")])
    with pytest.raises(PkiError, match="2.5.4.5"):
        dn_for(p)

"""ferry.pki.validate: start-up checks, one line each."""
from __future__ import annotations

import datetime as dt
import os
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ferry.pki import PkiError, init_ca, issue, validate_ca, validate_identity
from ferry.pki._files import write_cert, write_key

UTC = dt.timezone.utc


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    init_ca(d, fleet="acme")
    issue(d, "host-1", "host", sans=["10.201.1.2"])
    return d


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    assert isinstance(e.value, RuntimeError)
    return msg


def self_signed(path, *, ca: bool | None, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a ca")])
    now = dt.datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1)))
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    write_cert(path, b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_valid_identity(pki):
    ident = validate_identity(pki, "host-1", "host")
    assert ident.name == "host-1" and ident.kind == "host" and ident.fleet == "acme"
    assert ident.subject == "C=XX,O=acme,CN=host-1"
    assert ident.cert == pki / "hosts/host-1/cert.pem"
    assert ident.key == pki / "hosts/host-1/key.pem"
    assert ident.ca_cert == pki / "ca/ca-cert.pem"
    assert ident.not_after > dt.datetime.now(UTC) + dt.timedelta(days=800)
    assert ident.sans == ("DNS:host-1", "IP:10.201.1.2")
    # kind found from the layout; purpose checks pass for a host
    assert validate_identity(pki, "host-1", purpose="server").kind == "host"
    assert validate_identity(pki, "host-1", purpose="client").kind == "host"


def test_explicit_paths(pki, tmp_path):
    d = tmp_path / "elsewhere"
    d.mkdir()
    for f in ("hosts/host-1/cert.pem", "ca/ca-cert.pem"):
        shutil.copy(pki / f, d / f.replace("/", "_"))
    write_key(d / "k.pem", (pki / "hosts/host-1/key.pem").read_bytes())
    ident = validate_identity(None, cert=d / "hosts_host-1_cert.pem", key=d / "k.pem",
                              ca_cert=d / "ca_ca-cert.pem")
    assert ident.name == "host-1" and ident.kind is None
    with pytest.raises(PkiError, match="is for 'host-1', not 'host-2'"):
        validate_identity(None, "host-2", cert=d / "hosts_host-1_cert.pem", key=d / "k.pem",
                          ca_cert=d / "ca_ca-cert.pem")
    with pytest.raises(PkiError, match="needs a PKI folder"):
        validate_identity(None, cert=d / "hosts_host-1_cert.pem")


def test_missing_files(pki):
    (pki / "hosts/host-1/key.pem").unlink()
    with pytest.raises(PkiError) as e:
        validate_identity(pki, "host-1", "host")
    assert one_line(e) == f"missing TLS file: key {pki}/hosts/host-1/key.pem"
    (pki / "ca/ca-cert.pem").unlink()
    with pytest.raises(PkiError) as e:
        validate_identity(pki, "host-1", "host")
    assert "missing TLS files: key" in one_line(e) and "fleet CA certificate" in str(e.value)
    with pytest.raises(PkiError, match="no certificate for 'host-9'"):
        validate_identity(pki, "host-9")


def test_expired(pki):
    issue(pki, "old", "host", not_before=dt.datetime(2020, 1, 1, tzinfo=UTC),
          not_after=dt.datetime(2021, 1, 1, tzinfo=UTC))
    with pytest.raises(PkiError) as e:
        validate_identity(pki, "old", "host")
    msg = one_line(e)
    assert "has expired: valid from 2020-01-01 00:00:00 UTC until 2021-01-01 00:00:00 UTC, now is " in msg
    assert str(pki / "hosts/old/cert.pem") in msg


def test_not_yet_valid(pki):
    start = dt.datetime.now(UTC).replace(microsecond=0) + dt.timedelta(days=2)
    issue(pki, "future", "host", not_before=start, not_after=start + dt.timedelta(days=10))
    with pytest.raises(PkiError) as e:
        validate_identity(pki, "future", "host")
    msg = one_line(e)
    assert "is not yet valid: valid from " in msg and start.strftime("%Y-%m-%d %H:%M:%S UTC") in msg
    assert "clock" in msg
    # ... and valid at a later `now`
    assert validate_identity(pki, "future", "host", now=start + dt.timedelta(days=1)).name == "future"


def test_expired_ca(tmp_path):
    d = tmp_path / "pki"
    init_ca(d)
    issue(d, "h", "host")
    later = dt.datetime.now(UTC) + dt.timedelta(days=3651)
    with pytest.raises(PkiError, match="fleet CA certificate .* has expired"):
        validate_identity(d, "h", "host", now=later)


def test_key_does_not_match(pki):
    issue(pki, "host-2", "host")
    write_key(pki / "hosts/host-1/key.pem", (pki / "hosts/host-2/key.pem").read_bytes())
    with pytest.raises(PkiError) as e:
        validate_identity(pki, "host-1", "host")
    assert one_line(e).startswith(f"key {pki}/hosts/host-1/key.pem does not match certificate ")


def test_garbage_key_and_cert(pki):
    write_key(pki / "hosts/host-1/key.pem", b"hello")
    with pytest.raises(PkiError, match="is not a PEM private key"):
        validate_identity(pki, "host-1", "host")
    write_cert(pki / "hosts/host-1/cert.pem", b"hello")
    with pytest.raises(PkiError, match="is not a PEM certificate"):
        validate_identity(pki, "host-1", "host")


def test_encrypted_key(pki):
    key = ec.generate_private_key(ec.SECP256R1())
    write_key(pki / "hosts/host-1/key.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(PkiError, match="encrypted with a passphrase"):
        validate_identity(pki, "host-1", "host")


@pytest.mark.parametrize("ca, why", [(False, r"basicConstraints CA:FALSE"),
                                     (None, r"no basicConstraints extension")])
def test_ca_file_not_a_ca(pki, ca, why):
    self_signed(pki / "ca/ca-cert.pem", ca=ca)
    with pytest.raises(PkiError, match=f"is not a CA certificate \\({why}\\)") as e:
        validate_identity(pki, "host-1", "host")
    one_line(e)
    with pytest.raises(PkiError, match="is not a CA certificate"):
        validate_ca(pki / "ca/ca-cert.pem")


def test_leaf_given_as_ca(pki):
    """A host certificate in the CA's place: CA:FALSE."""
    shutil.copy(pki / "hosts/host-1/cert.pem", pki / "ca/ca-cert.pem")
    with pytest.raises(PkiError, match="CA:FALSE"):
        validate_identity(pki, "host-1", "host")


def test_cert_from_another_ca(pki, tmp_path):
    other = tmp_path / "other"
    init_ca(other, fleet="evil")
    issue(other, "host-1", "host")
    for f in ("cert.pem", "key.pem"):
        (pki / "hosts/host-1" / f).unlink()
        src = other / "hosts/host-1" / f
        (write_key if f == "key.pem" else write_cert)(pki / "hosts/host-1" / f, src.read_bytes())
    with pytest.raises(PkiError) as e:
        validate_identity(pki, "host-1", "host")
    msg = one_line(e)
    assert "is not signed by the fleet CA" in msg
    assert "issuer C=XX,O=evil,CN=evil fleet CA" in msg and "(C=XX,O=acme,CN=acme fleet CA)" in msg


def test_cert_from_another_ca_with_the_same_name(pki, tmp_path):
    """Same CA subject, different key: the signature check catches it, not just the issuer name."""
    other = tmp_path / "other"
    init_ca(other, fleet="acme")
    shutil.copy(other / "ca/ca-cert.pem", pki / "ca/ca-cert.pem")
    with pytest.raises(PkiError, match="is not signed by the fleet CA"):
        validate_identity(pki, "host-1", "host")


def test_ca_cert_as_identity(pki):
    with pytest.raises(PkiError, match="is a CA certificate"):
        validate_identity(None, cert=pki / "ca/ca-cert.pem", key=pki / "ca/ca-key.pem",
                          ca_cert=pki / "ca/ca-cert.pem")


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o644, 0o660, 0o700 | 0o004])
def test_key_permissions_refused(pki, bad_mode):
    key = pki / "hosts/host-1/key.pem"
    os.chmod(key, bad_mode)  # the test makes the bad state on purpose
    with pytest.raises(PkiError) as e:
        validate_identity(pki, "host-1", "host")
    assert one_line(e) == (f"key {key} is accessible by group/others (mode {bad_mode:04o}); "
                           f"run `chmod 600 {key}`")


def test_key_mode_0400_is_fine(pki):
    os.chmod(pki / "hosts/host-1/key.pem", 0o400)
    assert validate_identity(pki, "host-1", "host").name == "host-1"


def test_purpose(pki):
    issue(pki, "alice", "client")
    assert validate_identity(pki, "alice", purpose="client").kind == "client"
    with pytest.raises(PkiError, match="may not be used as a TLS server"):
        validate_identity(pki, "alice", purpose="server")

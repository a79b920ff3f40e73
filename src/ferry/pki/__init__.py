"""The fleet PKI: a CA, host/controller/client certificates, and their use by
`ssl` (controller <-> agent HTTPS) and QEMU (migration streams).

- `ca`: `init_ca`, `issue` - create the CA and issue certificates (library `cryptography`).
- `validate`: `validate_identity` - start-up checks, one-line `PkiError`s.
- `tlsctx`: `server_context`, `client_context`, `uvicorn_ssl_kwargs` - mutual TLS for HTTP.
- `qemu_creds`: `qemu_creds_dir`, `dn_for` - QEMU `tls-creds-x509` folders and `authz-simple` identities.
- `cli`: plain functions behind `ferry pki ...`.
"""
from ferry.pki.ca import CaPaths, IssuedPaths, KINDS, ca_paths, find_identity, identity_paths, init_ca, issue
from ferry.pki.errors import PkiError
from ferry.pki.qemu_creds import dn_for, qemu_creds_dir
from ferry.pki.tlsctx import client_context, https_url, server_context, uvicorn_ssl_kwargs
from ferry.pki.validate import Identity, validate_ca, validate_identity

__all__ = [
    "CaPaths", "IssuedPaths", "KINDS", "ca_paths", "find_identity", "identity_paths", "init_ca", "issue",
    "PkiError", "dn_for", "qemu_creds_dir", "client_context", "https_url", "server_context",
    "uvicorn_ssl_kwargs", "Identity", "validate_ca", "validate_identity",
]

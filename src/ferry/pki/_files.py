"""Writing key and certificate files with the right mode from the first byte.

A key file is created with mode 0600 by `os.open` (never chmod-ed after the
secret is in it), written to a temporary name in the same folder and renamed
into place, so a reader never sees a half-written file and a replaced key never
exists with a wider mode.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o755


def write_file(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` to `path` atomically; the file gets exactly `mode`, set before any byte is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        # the umask may have narrowed `mode`; set it exactly while the file is still empty
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_key(path: Path, pem: bytes) -> Path:
    return write_file(path, pem, KEY_MODE)


def write_cert(path: Path, pem: bytes) -> Path:
    return write_file(path, pem, CERT_MODE)

"""The one error type of `ferry.pki`."""
from __future__ import annotations


class PkiError(RuntimeError):
    """A certificate/key problem, with a one-line message that names the file and the fix."""

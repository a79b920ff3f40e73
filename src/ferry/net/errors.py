"""Errors raised by :mod:`ferry.net` (pure module: no effects, no imports of ferry)."""

from __future__ import annotations

from collections.abc import Sequence


class NetError(Exception):
    """Base class of every error raised by ferry.net."""


class InvalidNetValue(NetError, ValueError):
    """A name or address given by a caller is not acceptable (nothing was changed)."""


class AddressPoolExhausted(NetError):
    """No free VM address is left in the allocation pool."""


class NamespaceExistsError(NetError):
    """A lab namespace that should be created already exists (nothing was created)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        super().__init__(
            "lab network namespace(s) already exist: "
            + ", ".join(self.names)
            + " (destroy the old lab first, or use another prefix)"
        )


class NetCommandError(NetError):
    """An `ip`/`sysctl` command failed. The message is one line."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = " ".join(line.strip() for line in stderr.strip().splitlines() if line.strip())
        status = "timed out" if returncode is None else f"exit {returncode}"
        super().__init__(f"`{' '.join(self.argv)}` failed ({status}): {detail or 'no error output'}")

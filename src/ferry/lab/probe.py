"""Requests a lab client makes to a VM, run inside the client namespace.

`python -m ferry.lab.probe http URL` prints the reply body (exit 1 on failure);
`python -m ferry.lab.probe echo IP PORT TEXT` prints what the echo service returned.
"""
from __future__ import annotations

import socket
import subprocess
import sys

import httpx

from ferry.net.addressing import LabLayout


def client_argv(prefix: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", LabLayout(prefix).client_ns(), sys.executable, "-m", "ferry.lab.probe", *args]


def from_client(prefix: str, *args: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess:
    """Run a probe inside the lab's client namespace."""
    return subprocess.run(client_argv(prefix, *args), capture_output=True, text=True, timeout=timeout_s)


def main(argv: list[str]) -> int:
    kind, *rest = argv
    try:
        if kind == "http":
            reply = httpx.get(rest[0], timeout=5.0)
            reply.raise_for_status()
            sys.stdout.write(reply.text)
        elif kind == "echo":
            ip, port, text = rest
            with socket.create_connection((ip, int(port)), timeout=5.0) as s:
                s.sendall(text.encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            sys.stdout.write(data.decode())
        else:
            print(f"unknown probe {kind!r}", file=sys.stderr)
            return 2
    except (OSError, httpx.HTTPError) as exc:
        print(f"{kind} probe failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

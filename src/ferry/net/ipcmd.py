"""Thin effect layer over iproute2 (`ip`) and `sysctl`, run as subprocesses.

Argument-list builders (``*_argv``) are pure; ``run``/``ip``/``ip_json``/
``set_sysctls`` are the only functions here that touch the system.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from ferry.net.errors import NetCommandError, NetError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


# --------------------------------------------------------------------------- pure builders


def ip_argv(netns: str | None, *args: str) -> list[str]:
    """``ip [-n NETNS] ARGS...`` (``netns=None``: the current namespace)."""
    return ["ip", *(["-n", netns] if netns else []), *args]


def netns_exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """Run *argv* inside network namespace *ns*: ``ip netns exec NS ARGV...``."""
    return ["ip", "netns", "exec", ns, *argv]


def sysctl_argv(settings: Mapping[str, str | int], netns: str | None = None) -> list[str]:
    """``sysctl -q -w k=v ...``, wrapped in ``ip netns exec`` when *netns* is given.

    The sysctl binary is given by absolute path, because ``ip netns exec`` looks
    it up in PATH, which often lacks /usr/sbin for non-login shells."""
    argv = [resolve_tool("sysctl"), "-q", "-w", *(f"{k}={v}" for k, v in settings.items())]
    return netns_exec_argv(netns, argv) if netns else argv


# --------------------------------------------------------------------------- effects


@lru_cache(maxsize=None)
def resolve_tool(name: str) -> str:
    """Absolute path of a system tool (PATH first, then the sbin directories)."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN_DIRS:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    raise NetError(f"required tool {name!r} not found (install iproute2 / procps)")


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = DEFAULT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run *argv* (argv[0] resolved with :func:`resolve_tool`), capturing text output.

    With ``check`` a non-zero exit raises NetCommandError (one-line message)."""
    argv = list(argv)
    full = [resolve_tool(argv[0]), *argv[1:]]
    log.debug("run: %s", " ".join(argv))
    try:
        cp = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise NetCommandError(argv, None, str(e)) from None
    if check and cp.returncode != 0:
        raise NetCommandError(argv, cp.returncode, cp.stderr)
    return cp


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(ip_argv(netns, *args), check=check)


def ip_json(*args: str, netns: str | None = None) -> list[Any]:
    """``ip [-n NETNS] -j ARGS`` parsed. Empty output (which `ip` prints e.g. for
    ``netns list`` without /run/netns, or ``route show`` without a match) is []."""
    out = ip("-j", *args, netns=netns).stdout.strip()
    if not out:
        return []
    data = json.loads(out)
    return data if isinstance(data, list) else [data]


def set_sysctls(settings: Mapping[str, str | int], netns: str | None = None) -> None:
    if settings:
        run(sysctl_argv(settings, netns))


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    return [entry["name"] for entry in ip_json("netns", "list") if "name" in entry]


def netns_exists(ns: str) -> bool:
    return ns in list_netns()


def add_netns(ns: str) -> None:
    ip("netns", "add", ns)


def delete_netns(ns: str) -> bool:
    """Delete a named namespace; False if it did not exist. Interfaces inside it
    disappear once no process lives in the namespace any more."""
    cp = ip("netns", "del", ns, check=False)
    if cp.returncode == 0:
        return True
    if not netns_exists(ns):
        return False
    raise NetCommandError(["ip", "netns", "del", ns], cp.returncode, cp.stderr)


def netns_pids(ns: str) -> list[int]:
    """PIDs of processes living in namespace *ns* (``ip netns pids``)."""
    out = ip("netns", "pids", ns).stdout
    return [int(tok) for tok in out.split()]


def link_exists(ifname: str, netns: str | None = None) -> bool:
    cp = ip("-j", "link", "show", "dev", ifname, netns=netns, check=False)
    if cp.returncode == 0:
        return True
    if "does not exist" in cp.stderr or "Cannot find device" in cp.stderr:
        return False
    raise NetCommandError(ip_argv(netns, "-j", "link", "show", "dev", ifname), cp.returncode, cp.stderr)

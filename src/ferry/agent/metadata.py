"""The guest metadata service: a Google Compute Engine compatible metadata
server (the "guest notice of maintenance" part of it) at 169.254.169.254:80.

Guests reach it through their default route via the gateway: the agent puts
``METADATA_IP/32`` on lo of its namespace (``ferry.net.vmnet.ensure_metadata_address``).
Existing GCE guest scripts work unchanged::

    curl -H 'Metadata-Flavor: Google' \\
      'http://169.254.169.254/computeMetadata/v1/instance/maintenance-event?wait_for_change=true'

Which VM is asking
------------------
A guest is identified by the link its request arrives on, never by anything
it sends (source address, Host header, path). Every VM gets its own listening
socket bound to ``METADATA_IP:80`` with ``SO_BINDTODEVICE=<its tap>``; the
kernel delivers a connection only to the listener bound to the device the SYN
came in on (sockets bound to different devices do not conflict, so no
SO_REUSEPORT is needed). A link without a listener gets a RST. The binding is
by ifindex, taken at bind time: a tap deleted and re-created under the same
name needs ``add_vm`` again (it re-binds when the ifindex changed).

Semantics (GCE's)
-----------------
* Every request needs ``Metadata-Flavor: Google``; otherwise, or with an
  ``X-Forwarded-For`` header, 403 with GCE's error page. Every response
  carries ``Metadata-Flavor: Google``.
* ``/computeMetadata/v1/instance/maintenance-event``: ``NONE``,
  ``MIGRATE_ON_HOST_MAINTENANCE`` or ``TERMINATE_ON_HOST_MAINTENANCE``.
* ``/computeMetadata/v1/instance/upcoming-maintenance``: 404 when none, else
  JSON (``type``, ``maintenance_status``, ``window_start_time``, ...).
* ``instance/name``, ``instance/id``, ``instance/hostname``; ``instance/``
  lists the keys, ``instance/?recursive=true`` gives all as JSON.
* ``?alt=json|text``; text values are sent as ``application/text`` (as GCE does).
* Every 200 has an ``ETag``: a hash of the content (so it is the same on every
  host: a guest that moved keeps a valid ``last_etag``).
* ``?wait_for_change=true``: with ``last_etag=E`` different from the current
  ETag, answer at once; otherwise hang until the content's ETag differs from E
  (or from the ETag at request time when no last_etag is given), or until
  ``timeout_sec`` (then answer with the current content). A waiter sees every
  change in order, so a value that flips and flips back is still reported.

Responses also carry ``X-Ferry-Sent-At``: the host's wall clock (``time.time()``)
when the response was written, for measuring notice latency.

HTTP: a minimal HTTP/1.1 server (GET/HEAD, one request per connection,
``Connection: close``). A hanging request costs one coroutine; a client that
goes away while waiting is noticed (EOF) and its request dropped.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import socket
import sys
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ferry.net.addressing import METADATA_IP, validate_ifname

log = logging.getLogger(__name__)

MAINTENANCE_VALUES = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE")
PREFIX = "/computeMetadata/v1/"
UPCOMING_PATH = PREFIX + "instance/upcoming-maintenance"
SERVER = "Metadata Server for VM"
MAX_WAIT_S = 3600.0          # a wait_for_change without timeout_sec ends after this
HEAD_TIMEOUT_S = 10.0        # the request line and headers must arrive within this
MAX_HEADERS = 64
LINE_LIMIT = 8192
MAX_CONNECTIONS_PER_VM = 64  # beyond this a guest's connections are closed at once


def compute_etag(content: str) -> str:
    """GCE-style ETag (16 hex digits) of a value's canonical content."""
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def rfc3339(t: float) -> str:
    """Unix time -> RFC 3339 UTC with milliseconds, e.g. 2024-05-16T15:02:45.470Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def upcoming_maintenance(window_start: float, window_end: float, *, status: str = "PENDING",
                         type: str = "SCHEDULED", latest_window_start: float | None = None,
                         can_reschedule: bool = False) -> dict:
    """An ``upcoming-maintenance`` document with GCE's field names (times are Unix seconds).
    ``status``: PENDING (scheduled) or ONGOING; ``type``: SCHEDULED or UNSCHEDULED."""
    if status not in ("PENDING", "ONGOING"):
        raise ValueError(f"maintenance_status must be PENDING or ONGOING, not {status!r}")
    return {
        "can_reschedule": bool(can_reschedule),
        "latest_window_start_time": rfc3339(window_start if latest_window_start is None
                                            else latest_window_start),
        "maintenance_status": status,
        "type": type,
        "window_end_time": rfc3339(window_end),
        "window_start_time": rfc3339(window_start),
    }


# ---- state ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """What one VM's metadata says at one moment (immutable)."""
    name: str
    vm_id: str
    hostname: str
    maintenance_event: str = "NONE"
    upcoming: dict | None = None


class Version:
    """One snapshot in a VM's chain of changes; ``next`` resolves to the following one."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot
        self.next: asyncio.Future[Version] = asyncio.get_running_loop().create_future()


class VmState:
    """A VM's metadata, and the chain waiters follow. Lives in the event loop's thread."""

    def __init__(self, snapshot: Snapshot):
        self.current = Version(snapshot)

    @property
    def snapshot(self) -> Snapshot:
        return self.current.snapshot

    def update(self, **changes: Any) -> None:
        new = dataclasses.replace(self.snapshot, **changes)
        if new == self.snapshot:
            return
        old, self.current = self.current, Version(new)
        old.next.set_result(self.current)

    def close(self) -> None:
        if not self.current.next.done():
            self.current.next.cancel()


# ---- rendering (pure) -------------------------------------------------------------------------

@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]          # lower-case names


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/text"
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    def __init__(self, status: int, detail: str = ""):
        super().__init__(detail)
        self.status = status
        self.detail = detail


REASONS = {200: "OK", 301: "Moved Permanently", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def error_page(status: int, path: str, detail: str = "") -> bytes:
    """GCE's (Google front end's) HTML error page, without its styling."""
    reason = REASONS.get(status, "Error")
    if status == 403:
        text = (f"Your client does not have permission to get URL <code>{_html(path)}</code> "
                f"from this server. {detail} <ins>That\u2019s all we know.</ins>")
    elif status == 404:
        text = (f"The requested URL <code>{_html(path)}</code> was not found on this server."
                "  <ins>That\u2019s all we know.</ins>")
    else:
        text = f"{_html(detail)} <ins>That\u2019s all we know.</ins>"
    return ("<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
            "  <meta name=viewport content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n"
            f"  <title>Error {status} ({reason})!!1</title>\n"
            f"  <p><b>{status}.</b> <ins>That\u2019s an error.</ins>\n  <p>{text}\n").encode()


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _error(status: int, path: str, detail: str = "") -> Response:
    return Response(status, error_page(status, path, detail), "text/html; charset=UTF-8")


def parse_request(lines: list[bytes]) -> Request:
    """Request line and header lines (without the blank line) -> Request; HttpError(400)."""
    if not lines:
        raise HttpError(400, "empty request")
    try:
        method, target, version = lines[0].decode("latin-1").strip().split(" ")
    except ValueError:
        raise HttpError(400, "bad request line") from None
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        raise HttpError(400, "bad request line")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise HttpError(400, "bad header line")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    parts = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return Request(method, target, parts.path, query, headers)


def check_flavor(req: Request) -> str | None:
    """Why GCE would refuse the request (None: it may proceed)."""
    if "x-forwarded-for" in req.headers:
        return "Request denied: X-Forwarded-For header present."
    if req.headers.get("metadata-flavor") != "Google":
        return "Missing Metadata-Flavor:Google header."
    return None


def _entries(snap: Snapshot) -> dict[str, Any]:
    """instance/ keys -> content (str leaf or dict)."""
    d: dict[str, Any] = {"hostname": snap.hostname, "id": snap.vm_id,
                         "maintenance-event": snap.maintenance_event, "name": snap.name}
    if snap.upcoming is not None:
        d["upcoming-maintenance"] = snap.upcoming
    return d


def _camel(key: str) -> str:
    head, *rest = key.split("-")
    return head + "".join(w.capitalize() for w in rest)


def lookup(snap: Snapshot, path: str, recursive: bool) -> tuple[Any, bool] | None:
    """(content, is_directory) of *path* (below PREFIX) in *snap*, or None if absent."""
    entries = _entries(snap)
    if path == "":
        return ["instance/"], True
    if path == "instance/":
        if recursive:
            # GCE's recursive JSON uses camelCase keys; the id is a number there.
            return {_camel(k): (int(v) if k == "id" and v.isdigit() else v)
                    for k, v in entries.items()}, True
        return sorted(k for k in entries), True
    if path.startswith("instance/") and path.count("/") == 1:
        key = path[len("instance/"):]
        if key in entries:
            return entries[key], False
    return None


def render(snap: Snapshot, path: str, query: dict[str, str]) -> Response:
    """The 200/301/404 answer for *path* (full URL path) in *snap*; no waiting here."""
    if path in ("/computeMetadata", PREFIX.rstrip("/")):
        return Response(301, headers={"Location": path + "/"})
    if path in ("/", "/computeMetadata/"):
        return Response(200, b"computeMetadata/\n" if path == "/" else b"v1/\n")
    if not path.startswith(PREFIX):
        return _error(404, path)
    sub = path[len(PREFIX):]
    recursive = query.get("recursive", "").lower() == "true"
    found = lookup(snap, sub, recursive)
    if found is None:
        if lookup(snap, sub + "/", recursive) is not None:
            return Response(301, b"", headers={"Location": path + "/"})
        return _error(404, path)
    content, is_dir = found
    alt = query.get("alt", "json" if isinstance(content, dict) else "text")
    if alt not in ("json", "text"):
        raise HttpError(400, f"alt must be json or text, not {alt!r}")
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    if is_dir and isinstance(content, list):
        body = json.dumps(content) if alt == "json" else "".join(f"{k}\n" for k in content)
    elif isinstance(content, dict):
        body = (json.dumps(content, sort_keys=True) if alt == "json"
                else "".join(f"{k} {_text(v)}\n" for k, v in sorted(content.items())))
    else:
        body = json.dumps(content) if alt == "json" else str(content)
    ctype = "application/json" if alt == "json" else "application/text"
    return Response(200, body.encode(), ctype, {"ETag": compute_etag(canonical)})


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def wait_params(query: dict[str, str]) -> tuple[bool, str | None, float]:
    """(wait_for_change, last_etag, timeout_s) of a query; HttpError(400) if malformed."""
    wait = query.get("wait_for_change", "").lower() == "true"
    last = query.get("last_etag") or None
    timeout = MAX_WAIT_S
    if "timeout_sec" in query:
        try:
            timeout = float(int(query["timeout_sec"]))
        except ValueError:
            raise HttpError(400, "timeout_sec must be an integer") from None
        if timeout < 0:
            raise HttpError(400, "timeout_sec must be >= 0")
        timeout = min(timeout, MAX_WAIT_S)
    return wait, last, timeout


async def answer(state: VmState, req: Request, *, clock=time.monotonic) -> Response:
    """The response to *req* for the VM whose *state* it is (waits for wait_for_change)."""
    refusal = check_flavor(req)
    if refusal is not None:
        return _error(403, req.path, refusal)
    if req.method not in ("GET", "HEAD"):
        return Response(405, b"", headers={"Allow": "GET, HEAD"})
    try:
        wait, last_etag, timeout = wait_params(req.query)
        version = state.current
        resp = render(version.snapshot, req.path, req.query)
        etag = resp.headers.get("ETag")
        # A missing upcoming-maintenance (404) may be waited for; any other 404 may not.
        if not wait or resp.status != 200 and req.path != UPCOMING_PATH:
            return resp
        baseline = last_etag if last_etag is not None else etag
        if last_etag is not None and last_etag != etag:
            return resp
        deadline = clock() + timeout
        while True:
            remaining = deadline - clock()
            if remaining <= 0:
                return render(state.snapshot, req.path, req.query)
            try:
                version = await asyncio.wait_for(asyncio.shield(version.next), remaining)
            except asyncio.TimeoutError:
                return render(state.snapshot, req.path, req.query)
            resp = render(version.snapshot, req.path, req.query)
            if resp.headers.get("ETag") != baseline:
                return resp
    except HttpError as e:
        return _error(e.status, req.path, e.detail)


def serialize(resp: Response, head_only: bool = False) -> bytes:
    headers = {
        "Metadata-Flavor": "Google",
        "Content-Type": resp.content_type,
        **resp.headers,
        "Date": formatdate(usegmt=True),
        "Server": SERVER,
        "Content-Length": str(len(resp.body)),
        "X-XSS-Protection": "0",
        "X-Frame-Options": "SAMEORIGIN",
        "X-Ferry-Sent-At": f"{time.time():.6f}",
        "Connection": "close",
    }
    head = f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Error')}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else resp.body)


# ---- connections ------------------------------------------------------------------------------

async def read_head(reader: asyncio.StreamReader) -> list[bytes]:
    """Request line and header lines, up to the blank line; HttpError(400) when too big."""
    lines: list[bytes] = []
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise HttpError(400, "header line too long") from None
        except asyncio.IncompleteReadError as e:
            if not e.partial and not lines:
                raise ConnectionResetError("closed before a request") from None
            raise HttpError(400, "incomplete request") from None
        line = line.rstrip(b"\r\n")
        if not line:
            if not lines:       # tolerate blank lines before the request line
                continue
            return lines
        lines.append(line)
        if len(lines) > MAX_HEADERS + 1:
            raise HttpError(400, "too many header lines")


async def _until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(4096):
        pass


async def serve_connection(state: VmState, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter, on_eof=None) -> None:
    """One request on one connection of the VM whose *state* it is, then close.

    A client may half-close after its request (``printf ... | nc`` does), so EOF
    while a request waits does not end it; *on_eof* is called instead (the
    endpoint evicts such connections first when a guest has too many)."""
    try:
        try:
            req = parse_request(await asyncio.wait_for(read_head(reader), HEAD_TIMEOUT_S))
        except HttpError as e:
            writer.write(serialize(_error(e.status, "/", e.detail)))
            await writer.drain()
            return
        except (asyncio.TimeoutError, ConnectionError):
            return
        work = asyncio.ensure_future(answer(state, req))
        eof = asyncio.ensure_future(_until_eof(reader))
        try:
            done, _ = await asyncio.wait({work, eof}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                if eof.exception() is not None:      # reset: the client is gone
                    return
                if on_eof is not None:
                    on_eof()
                await work
        finally:
            eof.cancel()
            work.cancel()
        writer.write(serialize(work.result(), head_only=req.method == "HEAD"))
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def device_socket(bind_ip: str, port: int, device: str) -> socket.socket:
    """A listening TCP socket on bind_ip:port that accepts only connections arriving on
    *device* (SO_BINDTODEVICE; set before bind, so sockets on other devices do not conflict)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((bind_ip, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


class _Endpoint:
    """One VM: its state, its device-bound listener and its open connections."""

    def __init__(self, state: VmState, tap: str):
        self.state = state
        self.tap = tap
        self.ifindex: int | None = None
        self.server: asyncio.base_events.Server | None = None
        self.tasks: dict[asyncio.Task, bool] = {}   # connection -> the client sent EOF

    async def listen(self, bind_ip: str, port: int) -> None:
        self.ifindex = socket.if_nametoindex(self.tap)
        sock = device_socket(bind_ip, port, self.tap)
        self.server = await asyncio.start_server(self._on_connection, sock=sock, limit=LINE_LIMIT)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.tasks) >= MAX_CONNECTIONS_PER_VM:
            # One guest's connections never starve another's (each VM has its own budget).
            # Make room by dropping the oldest connection whose client has closed its end.
            victim = next((t for t, gone in self.tasks.items() if gone), None)
            if victim is None:
                writer.close()
                return
            victim.cancel()
            self.tasks.pop(victim, None)
        # The work runs in a task of its own: cancelling it (remove_vm, stop) ends this
        # callback normally, which asyncio's stream machinery expects.
        def client_closed() -> None:
            if task in self.tasks:
                self.tasks[task] = True

        task = asyncio.ensure_future(serve_connection(self.state, reader, writer, client_closed))
        self.tasks[task] = False
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
        finally:
            self.tasks.pop(task, None)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    @property
    def address(self) -> tuple[str, int] | None:
        if self.server is None or not self.server.sockets:
            return None
        return self.server.sockets[0].getsockname()[:2]


class MetadataService:
    """The metadata server of one host (asyncio; call everything from the agent's loop).

    ``bind_ip``/``port``: where guests find it (tests may use e.g. 127.0.0.1 and
    port 0 = a free port per VM, see :meth:`address`); ``domain``: the
    ``hostname`` is ``<name>.<domain>`` (just the name without one)."""

    def __init__(self, bind_ip: str = METADATA_IP, port: int = 80, *, domain: str | None = None):
        self.bind_ip = bind_ip
        self.port = port
        self.domain = domain
        self._vms: dict[str, _Endpoint] = {}
        self._started = False
        self._lock: asyncio.Lock | None = None

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def start(self) -> None:
        """Start serving every VM added so far (and every VM added from now on)."""
        async with self._get_lock():
            self._started = True
            for name, ep in self._vms.items():
                if ep.server is None:
                    with contextlib.suppress(OSError):   # logged; one bad tap stops no other VM
                        await self._listen(name, ep)

    async def stop(self) -> None:
        """Close every listener and connection; the VMs' state is kept (start() again serves it)."""
        async with self._get_lock():
            self._started = False
            for ep in self._vms.values():
                await ep.close()

    async def add_vm(self, name: str, tap: str, vm_id: int | str) -> None:
        """Serve VM *name* on *tap* (which must exist). Idempotent: keeps the VM's state; re-binds
        when the tap changed or was re-created (new ifindex). A bind failure is logged and
        raised (the VM is still recorded, so a later add_vm retries)."""
        validate_ifname(tap)
        vm_id = str(vm_id)
        if not (0 < len(vm_id) <= 64 and vm_id.isprintable() and not any(c.isspace() for c in vm_id)):
            raise ValueError(f"invalid VM id {vm_id!r}")
        if not (0 < len(name) <= 253 and name.isprintable()):
            raise ValueError(f"invalid VM name {name!r}")
        async with self._get_lock():
            ep = self._vms.get(name)
            hostname = f"{name}.{self.domain}" if self.domain else name
            if ep is None:
                ep = _Endpoint(VmState(Snapshot(name=name, vm_id=vm_id, hostname=hostname)), tap)
                self._vms[name] = ep
            else:
                ep.state.update(vm_id=vm_id, hostname=hostname)
                if ep.tap != tap or ep.ifindex != _ifindex(tap):
                    await ep.close()
                    ep.tap = tap
            if self._started and ep.server is None:
                await self._listen(name, ep)

    async def _listen(self, name: str, ep: _Endpoint) -> None:
        try:
            await ep.listen(self.bind_ip, self.port)
        except OSError as e:
            log.error("metadata: cannot listen on %s:%d dev %s for VM %s: %s",
                      self.bind_ip, self.port, ep.tap, name, e)
            raise
        log.info("metadata: serving VM %s on %s:%d dev %s", name, self.bind_ip, self.port, ep.tap)

    async def remove_vm(self, name: str) -> None:
        """Stop serving VM *name* (hanging requests are dropped); no-op if unknown."""
        async with self._get_lock():
            ep = self._vms.pop(name, None)
            if ep is not None:
                await ep.close()
                ep.state.close()

    def set_maintenance_event(self, name: str, value: str, upcoming: dict | None = None) -> None:
        """Set what VM *name*'s guest sees; wakes the guest's hanging wait_for_change GETs."""
        if value not in MAINTENANCE_VALUES:
            raise ValueError(f"maintenance event must be one of {', '.join(MAINTENANCE_VALUES)}, not {value!r}")
        if upcoming is not None:
            if not isinstance(upcoming, dict):
                raise ValueError("upcoming maintenance must be a dict or None")
            upcoming = json.loads(json.dumps(upcoming))   # a private, JSON-clean copy
        self._endpoint(name).state.update(maintenance_event=value, upcoming=upcoming)

    def get_maintenance_event(self, name: str) -> str:
        return self._endpoint(name).state.snapshot.maintenance_event

    def get_upcoming_maintenance(self, name: str) -> dict | None:
        up = self._endpoint(name).state.snapshot.upcoming
        return json.loads(json.dumps(up)) if up is not None else None

    def address(self, name: str) -> tuple[str, int] | None:
        """Where VM *name* is served (ip, port), None while not listening."""
        return self._endpoint(name).address

    def vms(self) -> list[str]:
        return sorted(self._vms)

    def _endpoint(self, name: str) -> _Endpoint:
        try:
            return self._vms[name]
        except KeyError:
            raise KeyError(f"metadata service has no VM {name!r}") from None


def _ifindex(tap: str) -> int | None:
    try:
        return socket.if_nametoindex(tap)
    except OSError:
        return None


# ---- stand-alone (tests, debugging) ---------------------------------------------------------

async def _serve_stdin(args: argparse.Namespace) -> None:
    """Commands on stdin, one per line, each answered by one line on stdout:
    ``add NAME TAP ID`` / ``set NAME VALUE [UPCOMING_JSON]`` (answer ``ok <unix time>``) /
    ``get NAME`` / ``remove NAME`` / ``quit``. Answers ``ok ...`` or ``err <message>``."""
    svc = MetadataService(args.bind, args.port, domain=args.domain)
    await svc.start()
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "quit":
                break
            cmd, *rest = line.strip().split(None, 3) or [""]
            try:
                if cmd == "add" and len(rest) == 3:
                    await svc.add_vm(rest[0], rest[1], rest[2])
                    out = f"ok {svc.address(rest[0])[1]}"
                elif cmd == "set" and len(rest) >= 2:
                    upcoming = json.loads(rest[2]) if len(rest) == 3 else None
                    svc.set_maintenance_event(rest[0], rest[1], upcoming)
                    out = f"ok {time.time():.6f}"
                elif cmd == "get" and len(rest) == 1:
                    out = f"ok {svc.get_maintenance_event(rest[0])}"
                elif cmd == "remove" and len(rest) == 1:
                    await svc.remove_vm(rest[0])
                    out = "ok"
                else:
                    out = f"err unknown command {line.strip()!r}"
            except (KeyError, ValueError, OSError) as e:
                out = f"err {e}"
            print(out, flush=True)
    finally:
        await svc.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferry.agent.metadata",
                                description="Run the guest metadata service alone, driven by "
                                            "line commands on stdin (tests, debugging).")
    p.add_argument("--bind", default=METADATA_IP)
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--domain", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve_stdin(args))


if __name__ == "__main__":
    main()

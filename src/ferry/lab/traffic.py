"""Traffic probe: what a client of a VM sees while the VM migrates ("ferry probe VM").

Run inside the lab's client namespace (it connects to the VM's address like
any client would)::

    python -m ferry.lab.traffic --ip IP --duration S [--json] [--timeline]

For S seconds (at most MAX_DURATION_S), two concurrent streams:

* echo: ONE long-lived TCP connection to IP:7 (the guest's ``nc -ll -p 7 -e
  cat``); a numbered line every 10 ms; every echoed line must come back
  unchanged and in order. Measures each round trip and the longest gap between
  consecutive replies. The connection *survived* if it was never reset, closed
  or stalled (no echo for ``--stall-timeout`` s while lines were outstanding)
  and every line came back, in order, by the end (``--drain-timeout``).
* http: ``GET http://IP/cgi-bin/status`` on a new connection every 50 ms
  (each with a 2 s timeout, several in flight at once). Counts ok/failed, the
  longest gap between consecutive successful replies, latencies.

The report (JSON with ``--json``) goes to stdout; ``traffic: ready`` goes to
stderr once the echo connection works, so a test can start the probe, wait
until it is ready, migrate, then :func:`collect` the report. Exit status 0 if
the echo connection survived and no HTTP request failed, 1 otherwise, 2 on bad
arguments. All times in the timeline are ``time.monotonic()`` seconds: the
same clock as the caller's (network namespaces share it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import select
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ferry.net.addressing import LabLayout
from ferry.net.ipcmd import netns_exec_argv

MAX_DURATION_S = 300.0
ECHO_PORT = 7
ECHO_INTERVAL_S = 0.010
ECHO_TAG = "ferry-traffic"
HTTP_PATH = "/cgi-bin/status"
HTTP_INTERVAL_S = 0.050
HTTP_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 2.0
STALL_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 5.0
READY_LINE = "traffic: ready"


# --------------------------------------------------------------------------- pure statistics


def longest_gap(times: Sequence[float], start: float | None = None, end: float | None = None) -> float:
    """Longest interval between consecutive *times* (seconds).

    With *start*/*end*, the stretches from *start* to the first time and from
    the last time to *end* count too (replies that stop for good are one long
    gap), and times outside [start, end] are clipped to it. Without any time,
    the gap is ``end - start`` (0 if either is missing)."""
    pts = sorted(float(t) for t in times)
    if start is not None:
        pts = [max(t, start) for t in pts]
        pts.insert(0, float(start))
    if end is not None:
        pts = [min(t, end) for t in pts]
        pts.append(float(end))
    return max((b - a for a, b in zip(pts, pts[1:])), default=0.0)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (*q* in 0..100) of *values*; None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q!r} outside 0..100")
    if not values:
        return None
    s = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(s)))
    return s[rank - 1]


def latency_summary_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p99/max of durations given in seconds, in milliseconds."""
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)
    return {"p50": ms(percentile(values_s, 50)), "p99": ms(percentile(values_s, 99)),
            "max": ms(max(values_s) if values_s else None)}


def count_between(times: Sequence[float], start: float, end: float) -> int:
    """How many of *times* fall in [start, end]."""
    return sum(1 for t in times if start <= t <= end)


@dataclass
class EchoTracker:
    """Bookkeeping of the echo stream (pure: the caller passes the clock)."""

    sent_at: list[float] = field(default_factory=list)
    reply_at: list[float] = field(default_factory=list)
    rtts: list[float] = field(default_factory=list)
    failure: str | None = None

    @staticmethod
    def line(seq: int) -> bytes:
        return f"{seq} {ECHO_TAG}\n".encode()

    @property
    def sent(self) -> int:
        return len(self.sent_at)

    @property
    def received(self) -> int:
        return len(self.reply_at)

    @property
    def outstanding(self) -> int:
        return self.sent - self.received

    def next_line(self, now: float) -> bytes:
        """The next line to send (records its send time)."""
        self.sent_at.append(now)
        return self.line(len(self.sent_at) - 1)

    def on_reply(self, data: bytes, now: float) -> bool:
        """Account for one echoed line; False (and a failure) if it is not the
        next line expected."""
        if self.failure is not None:
            return False
        seq = self.received
        if seq >= self.sent:
            self.fail(f"unexpected data: {data[:40]!r}")
            return False
        if data != self.line(seq):
            self.fail(f"out of order or corrupted: expected line {seq}, got {data[:40]!r}")
            return False
        self.reply_at.append(now)
        self.rtts.append(now - self.sent_at[seq])
        return True

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason


@dataclass
class HttpStats:
    started_at: list[float] = field(default_factory=list)
    ok_at: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    failed_started_at: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.ok_at)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def on_ok(self, start: float, now: float) -> None:
        self.ok_at.append(now)
        self.latencies.append(now - start)

    def on_error(self, kind: str, start: float | None = None) -> None:
        self.errors[kind] += 1
        if start is not None:
            self.failed_started_at.append(start)


def build_report(*, ip: str, start: float, end: float, echo: EchoTracker, echo_connected: bool,
                 echo_connected_at: float | None, http: HttpStats, url: str,
                 timeline: bool = False) -> dict[str, Any]:
    """The probe's JSON report (pure)."""
    survived = echo_connected and echo.failure is None and echo.outstanding == 0 and echo.sent > 0
    report: dict[str, Any] = {
        "ip": ip,
        "duration_s": round(end - start, 3),
        "started_at": round(start, 4),
        "ended_at": round(end, 4),
        "echo": {
            "port": ECHO_PORT,
            "connected": echo_connected,
            "sent": echo.sent,
            "received": echo.received,
            "survived": survived,
            "failure": echo.failure,
            "longest_gap_ms": round(longest_gap(echo.reply_at, echo_connected_at or start, end) * 1000, 1),
            "rtt_ms": latency_summary_ms(echo.rtts),
        },
        "http": {
            "url": url,
            "requests": len(http.started_at),
            "ok": http.ok,
            "failed": http.failed,
            "errors": dict(sorted(http.errors.items())),
            "longest_gap_ms": round(longest_gap(http.ok_at, start, end) * 1000, 1),
            "latency_ms": latency_summary_ms(http.latencies),
        },
    }
    if timeline:
        report["timeline"] = {"echo_replies": [round(t, 4) for t in echo.reply_at],
                              "http_ok": [round(t, 4) for t in http.ok_at],
                              "http_failed_started": [round(t, 4) for t in sorted(http.failed_started_at)]}
    return report


def ok(report: dict[str, Any]) -> bool:
    return bool(report["echo"]["survived"]) and report["http"]["failed"] == 0


# --------------------------------------------------------------------------- the probe


@dataclass
class ProbeConfig:
    ip: str
    duration_s: float
    echo_port: int = ECHO_PORT
    echo_interval_s: float = ECHO_INTERVAL_S
    http_path: str = HTTP_PATH
    http_interval_s: float = HTTP_INTERVAL_S
    http_timeout_s: float = HTTP_TIMEOUT_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    stall_timeout_s: float = STALL_TIMEOUT_S
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    timeline: bool = False
    output_json: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.ip}{self.http_path}"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _echo(cfg: ProbeConfig, end: float, tr: EchoTracker) -> tuple[bool, float | None]:
    """The long-lived echo connection. Returns (connected, connected_at)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(cfg.ip, cfg.echo_port),
                                                cfg.connect_timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        tr.fail(f"connect: {exc.__class__.__name__}: {exc}")
        _say(f"traffic: echo connect to {cfg.ip}:{cfg.echo_port} failed: {tr.failure}")
        return False, None
    connected_at = time.monotonic()
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sending_done = asyncio.Event()
    ready = asyncio.Event()

    async def read() -> None:
        while tr.failure is None:
            if sending_done.is_set() and tr.outstanding == 0:
                return
            try:
                data = await asyncio.wait_for(reader.readline(), cfg.stall_timeout_s)
            except asyncio.TimeoutError:
                if tr.outstanding:
                    tr.fail(f"timeout: no echo for {cfg.stall_timeout_s:g} s ({tr.outstanding} lines outstanding)")
                    return
                continue
            except (OSError, ValueError) as exc:  # ValueError: a line over the stream limit
                tr.fail(f"reset: {exc.__class__.__name__}: {exc}")
                return
            if not data or not data.endswith(b"\n"):
                tr.fail("eof: the server closed the connection")
                return
            tr.on_reply(data, time.monotonic())
            ready.set()

    reader_task = asyncio.create_task(read())
    try:
        next_t = time.monotonic()
        while tr.failure is None and not reader_task.done():
            now = time.monotonic()
            if now >= end:
                break
            writer.write(tr.next_line(now))
            if writer.transport.get_write_buffer_size() > 1 << 20:
                tr.fail("send buffer full: the connection does not move")
                break
            if tr.sent == 1:
                # the first line must come back before the run counts as started
                try:
                    await asyncio.wait_for(ready.wait(), cfg.connect_timeout_s)
                    _say(READY_LINE)
                except asyncio.TimeoutError:
                    pass  # the reader reports the stall; keep sending
                next_t = time.monotonic()
            next_t = max(next_t + cfg.echo_interval_s, time.monotonic())  # late: no burst to catch up
            await asyncio.sleep(max(0.0, min(next_t, end) - time.monotonic()))
        sending_done.set()
        if tr.outstanding and tr.failure is None and not reader_task.done():
            # the reader returns once the last line is back
            try:
                await asyncio.wait_for(asyncio.shield(reader_task), cfg.drain_timeout_s)
            except asyncio.TimeoutError:
                tr.fail(f"timeout: {tr.outstanding} lines not echoed within {cfg.drain_timeout_s:g} s of the end")
    finally:
        reader_task.cancel()
        try:
            await reader_task
        except (asyncio.CancelledError, Exception):
            pass
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, asyncio.TimeoutError):
            pass
    return True, connected_at


async def _http(cfg: ProbeConfig, start: float, end: float, st: HttpStats) -> None:
    """A new connection every http_interval_s, each request bounded by http_timeout_s."""
    limits = httpx.Limits(max_keepalive_connections=0, max_connections=1000)
    timeout = httpx.Timeout(cfg.http_timeout_s)
    # trust_env=False: never through a proxy from the environment
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False,
                                 headers={"Connection": "close"}) as client:

        async def one() -> None:
            t0 = time.monotonic()
            st.started_at.append(t0)
            try:
                reply = await asyncio.wait_for(client.get(cfg.url), cfg.http_timeout_s + 0.5)
            except (httpx.HTTPError, OSError, asyncio.TimeoutError) as exc:
                st.on_error(exc.__class__.__name__, t0)
                return
            if reply.status_code == 200:
                st.on_ok(t0, time.monotonic())
            else:
                st.on_error(f"HTTP {reply.status_code}", t0)

        tasks: set[asyncio.Task[None]] = set()
        next_t = start
        while time.monotonic() < end:
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_t = max(next_t + cfg.http_interval_s, time.monotonic())
            await asyncio.sleep(max(0.0, min(next_t, end) - time.monotonic()))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def run_traffic(cfg: ProbeConfig) -> dict[str, Any]:
    """Run both streams for cfg.duration_s seconds and return the report."""
    if not 0 < cfg.duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration must be in (0, {MAX_DURATION_S:g}] s")
    echo, http = EchoTracker(), HttpStats()
    start = time.monotonic()
    end = start + cfg.duration_s
    echo_task = asyncio.create_task(_echo(cfg, end, echo))
    http_task = asyncio.create_task(_http(cfg, start, end, http))
    connected, connected_at = await echo_task
    await http_task
    return build_report(ip=cfg.ip, start=start, end=end, echo=echo, echo_connected=connected,
                        echo_connected_at=connected_at, http=http, url=cfg.url, timeline=cfg.timeline)


def format_report(r: dict[str, Any]) -> str:
    e, h = r["echo"], r["http"]
    return "\n".join([
        f"traffic to {r['ip']} for {r['duration_s']:.1f} s",
        f"  echo :{e['port']}  {'survived' if e['survived'] else 'BROKEN: ' + str(e['failure'])}  "
        f"{e['received']}/{e['sent']} lines, longest gap {e['longest_gap_ms']:.0f} ms, "
        f"rtt p50 {e['rtt_ms']['p50']} ms p99 {e['rtt_ms']['p99']} ms",
        f"  http {h['url']}  {h['ok']} ok, {h['failed']} failed {h['errors'] or ''}, "
        f"longest gap {h['longest_gap_ms']:.0f} ms, latency p50 {h['latency_ms']['p50']} ms "
        f"p99 {h['latency_ms']['p99']} ms",
    ])


def _duration(value: str) -> float:
    d = float(value)
    if not 0 < d <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_DURATION_S:g}]")
    return d


def _positive(value: str) -> float:
    d = float(value)
    if not 0 < d <= 60:
        raise argparse.ArgumentTypeError("must be in (0, 60]")
    return d


def parse_args(argv: Sequence[str]) -> ProbeConfig:
    p = argparse.ArgumentParser(prog="python -m ferry.lab.traffic", description=__doc__.split("\n\n")[0])
    p.add_argument("--ip", required=True, help="the VM's address")
    p.add_argument("--duration", type=_duration, required=True, help=f"seconds (max {MAX_DURATION_S:g})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--timeline", action="store_true", help="include every reply time (JSON)")
    p.add_argument("--echo-port", type=int, default=ECHO_PORT)
    p.add_argument("--echo-interval", type=_positive, default=ECHO_INTERVAL_S)
    p.add_argument("--http-path", default=HTTP_PATH)
    p.add_argument("--http-interval", type=_positive, default=HTTP_INTERVAL_S)
    p.add_argument("--http-timeout", type=_positive, default=HTTP_TIMEOUT_S)
    p.add_argument("--stall-timeout", type=_positive, default=STALL_TIMEOUT_S)
    p.add_argument("--drain-timeout", type=_positive, default=DRAIN_TIMEOUT_S)
    a = p.parse_args(list(argv))
    return ProbeConfig(ip=a.ip, duration_s=a.duration, echo_port=a.echo_port, echo_interval_s=a.echo_interval,
                       http_path=a.http_path, http_interval_s=a.http_interval, http_timeout_s=a.http_timeout,
                       stall_timeout_s=a.stall_timeout, drain_timeout_s=a.drain_timeout, timeline=a.timeline,
                       output_json=a.json or a.timeline)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    # hard bound: whatever happens, the probe ends
    bound = cfg.duration_s + cfg.drain_timeout_s + cfg.http_timeout_s + cfg.connect_timeout_s + 5
    try:
        report = asyncio.run(asyncio.wait_for(run_traffic(cfg), bound))
    except asyncio.TimeoutError:
        _say(f"traffic: probe did not end within {bound:g} s")
        return 1
    if cfg.output_json:
        print(json.dumps(report), flush=True)
    else:
        print(format_report(report), flush=True)
    return 0 if ok(report) else 1


# --------------------------------------------------------------------------- helpers for tests / the lab


def client_argv(prefix: str, ip: str, duration_s: float, *, timeline: bool = False,
                extra: Sequence[str] = ()) -> list[str]:
    """argv that runs the probe inside lab *prefix*'s client namespace (pure)."""
    argv = [sys.executable, "-m", "ferry.lab.traffic", "--ip", ip, "--duration", f"{float(duration_s):g}", "--json"]
    if timeline:
        argv.append("--timeline")
    return netns_exec_argv(LabLayout(prefix).client_ns(), [*argv, *extra])


def run_probe_in_client(prefix: str, ip: str, duration_s: float, *, timeline: bool = False,
                        extra: Sequence[str] = ()) -> subprocess.Popen[str]:
    """Start the probe in the lab's client namespace; returns at once.

    Follow with :func:`wait_ready` (optional) and :func:`collect`. The caller
    owns the process (``collect`` kills it if it overstays)."""
    if not 0 < float(duration_s) <= MAX_DURATION_S:
        raise ValueError(f"duration must be in (0, {MAX_DURATION_S:g}] s")
    proc = subprocess.Popen(client_argv(prefix, ip, duration_s, timeline=timeline, extra=extra),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.probe_deadline = time.monotonic() + float(duration_s) + DRAIN_TIMEOUT_S + 20  # type: ignore[attr-defined]
    proc.probe_stderr = []  # type: ignore[attr-defined]
    return proc


def wait_ready(proc: subprocess.Popen[str], timeout_s: float = 10.0) -> bool:
    """Wait until the probe's echo connection works (its ``traffic: ready``
    line); False if it failed or *timeout_s* passed."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()  # raw reads: nothing may sit in a buffer communicate() does not see
    lines: list[str] = getattr(proc, "probe_stderr", [])
    deadline = time.monotonic() + timeout_s
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            if buf:
                lines.append(buf.decode(errors="replace"))
            return False
        byte = os.read(fd, 1)
        if not byte:
            if buf:
                lines.append(buf.decode(errors="replace"))
            return False
        buf += byte
        if byte == b"\n":
            line, buf = buf.decode(errors="replace"), b""
            lines.append(line)
            if line.strip() == READY_LINE:
                return True
            if line.startswith("traffic:"):
                return False


def collect(proc: subprocess.Popen[str], timeout_s: float | None = None) -> dict[str, Any]:
    """Wait for the probe to end and return its report.

    Raises RuntimeError if it produced no report (the process is killed if it
    is still running after *timeout_s*, default: its duration plus margins)."""
    if timeout_s is None:
        timeout_s = max(1.0, getattr(proc, "probe_deadline", time.monotonic() + 60) - time.monotonic())
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"traffic probe (pid {proc.pid}) overstayed and was killed: {err.strip()}") from None
    err = "".join(getattr(proc, "probe_stderr", [])) + (err or "")
    for line in reversed((out or "").strip().splitlines()):
        if line.startswith("{"):
            report: dict[str, Any] = json.loads(line)
            report["exit_status"] = proc.returncode
            return report
    raise RuntimeError(f"traffic probe exited {proc.returncode} without a report: {err.strip() or out.strip()}")


if __name__ == "__main__":
    sys.exit(main())

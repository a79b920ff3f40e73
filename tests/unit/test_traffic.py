"""The pure parts of the traffic probe (ferry.lab.traffic): statistics, the
echo bookkeeping, the report, arguments. No network."""

from __future__ import annotations

import sys

import pytest

from ferry.lab import traffic as t


def test_longest_gap() -> None:
    assert t.longest_gap([]) == 0.0
    assert t.longest_gap([1.0]) == 0.0
    assert t.longest_gap([1.0, 1.01, 1.02, 3.5, 3.51]) == pytest.approx(2.48)
    assert t.longest_gap([3.5, 1.0, 1.01]) == pytest.approx(2.49)  # order does not matter
    # edges count: replies that start late, or stop for good
    assert t.longest_gap([1.0, 1.1], start=0.0, end=1.2) == pytest.approx(1.0)
    assert t.longest_gap([1.0, 1.1], start=0.9, end=5.0) == pytest.approx(3.9)
    assert t.longest_gap([], start=2.0, end=7.0) == pytest.approx(5.0)
    # times outside [start, end] are clipped
    assert t.longest_gap([0.5, 1.0, 9.0], start=1.0, end=2.0) == pytest.approx(1.0)


def test_percentile_and_summary() -> None:
    values = [float(i) for i in range(1, 101)]
    assert t.percentile(values, 50) == 50.0
    assert t.percentile(values, 99) == 99.0
    assert t.percentile(values, 100) == 100.0
    assert t.percentile(values, 0) == 1.0
    assert t.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert t.percentile([], 50) is None
    with pytest.raises(ValueError):
        t.percentile(values, 101)
    assert t.latency_summary_ms([0.001, 0.002, 0.100]) == {"p50": 2.0, "p99": 100.0, "max": 100.0}
    assert t.latency_summary_ms([]) == {"p50": None, "p99": None, "max": None}
    assert t.count_between([1.0, 2.0, 3.0, 4.0], 2.0, 3.5) == 2


def test_echo_tracker_in_order() -> None:
    tr = t.EchoTracker()
    lines = [tr.next_line(10.0 + i * 0.01) for i in range(3)]
    assert lines[0] == b"0 ferry-traffic\n" and tr.sent == 3 and tr.outstanding == 3
    assert tr.on_reply(lines[0], 10.001) and tr.on_reply(lines[1], 10.012)
    assert tr.received == 2 and tr.outstanding == 1 and tr.failure is None
    assert tr.rtts == pytest.approx([0.001, 0.002])


@pytest.mark.parametrize("reply, reason", [
    (b"1 ferry-traffic\n", "out of order"),
    (b"0 ferry-traffiX\n", "corrupted"),
])
def test_echo_tracker_rejects_wrong_lines(reply: bytes, reason: str) -> None:
    tr = t.EchoTracker()
    tr.next_line(1.0)
    tr.next_line(1.01)
    assert not tr.on_reply(reply, 1.02)
    assert reason in (tr.failure or "")
    assert not tr.on_reply(b"0 ferry-traffic\n", 1.03)  # the first failure sticks
    assert tr.received == 0


def test_echo_tracker_unexpected_data() -> None:
    tr = t.EchoTracker()
    assert not tr.on_reply(b"0 ferry-traffic\n", 1.0)
    assert (tr.failure or "").startswith("unexpected")


def _report(**kw):  # type: ignore[no-untyped-def]
    tr = t.EchoTracker()
    for i in range(5):
        line = tr.next_line(100.0 + i)
        if i != 2 or not kw.get("lose_one"):
            tr.on_reply(line, 100.0 + i + 0.001)
    http = t.HttpStats()
    for i in range(4):
        http.started_at.append(100.0 + i)
        if i == 1:
            http.on_error("ConnectTimeout", 100.0 + i)
        else:
            http.on_ok(100.0 + i, 100.0 + i + 0.002)
    return t.build_report(ip="10.200.0.10", start=100.0, end=105.0, echo=tr, echo_connected=True,
                          echo_connected_at=100.0, http=http, url="http://10.200.0.10/cgi-bin/status",
                          timeline=kw.get("timeline", False))


def test_build_report() -> None:
    r = _report()
    e, h = r["echo"], r["http"]
    assert r["duration_s"] == 5.0 and r["ip"] == "10.200.0.10" and "timeline" not in r
    assert (e["sent"], e["received"], e["survived"], e["failure"]) == (5, 5, True, None)
    assert e["longest_gap_ms"] == pytest.approx(1000.0, abs=1)  # one reply per second, and to the end
    assert e["rtt_ms"]["p50"] == pytest.approx(1.0)
    assert (h["requests"], h["ok"], h["failed"], h["errors"]) == (4, 3, 1, {"ConnectTimeout": 1})
    assert h["longest_gap_ms"] == pytest.approx(2000.0, abs=1)  # 100.002 -> 102.002
    assert not t.ok(r)  # an HTTP request failed

    lost = _report(lose_one=True)
    assert not lost["echo"]["survived"]  # a line never came back (and the next is out of order)
    assert "out of order" in lost["echo"]["failure"]

    tl = _report(timeline=True)["timeline"]
    assert len(tl["echo_replies"]) == 5 and len(tl["http_ok"]) == 3 and tl["http_failed_started"] == [101.0]
    assert "longest gap" in t.format_report(r)


def test_parse_args() -> None:
    cfg = t.parse_args(["--ip", "10.200.0.10", "--duration", "5"])
    assert (cfg.ip, cfg.duration_s, cfg.output_json, cfg.timeline) == ("10.200.0.10", 5.0, False, False)
    assert cfg.url == "http://10.200.0.10/cgi-bin/status"
    assert (cfg.echo_interval_s, cfg.http_interval_s, cfg.http_timeout_s) == (0.01, 0.05, 2.0)
    assert t.parse_args(["--ip", "x", "--duration", "1", "--timeline"]).output_json  # implies --json
    for bad in ("0", "301", "-1"):
        with pytest.raises(SystemExit):
            t.parse_args(["--ip", "x", "--duration", bad])
    assert t.main(["--ip", "x", "--duration", "9999"]) == 2


def test_client_argv() -> None:
    argv = t.client_argv("ft1a2b", "10.200.0.10", 6, timeline=True)
    assert argv[:4] == ["ip", "netns", "exec", "ft1a2b-client"]
    assert argv[4:] == [sys.executable, "-m", "ferry.lab.traffic", "--ip", "10.200.0.10", "--duration", "6",
                        "--json", "--timeline"]
    with pytest.raises(ValueError):
        t.run_probe_in_client("ft1a2b", "10.200.0.10", 301)

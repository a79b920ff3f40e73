"""The guest metadata service (GCE semantics): pure parts, waits, and the HTTP layer."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time

import pytest

from ferry.agent import metadata as md
from ferry.agent.metadata import (
    MetadataService,
    Request,
    Snapshot,
    VmState,
    answer,
    compute_etag,
    parse_request,
    render,
    serve_connection,
    upcoming_maintenance,
)

P = md.PREFIX + "instance/"
GOOGLE = {"metadata-flavor": "Google"}


def req(path: str, headers: dict | None = None, method: str = "GET", **query) -> Request:
    return Request(method, path, path, {k: str(v) for k, v in query.items()},
                   GOOGLE if headers is None else headers)


def state(**kw) -> VmState:
    return VmState(Snapshot(name="vm1", vm_id="4242", hostname="vm1", **kw))


# ---- pure ------------------------------------------------------------------------------------

def test_etag_is_a_stable_16_hex_digest_of_the_content():
    assert compute_etag("NONE") == compute_etag("NONE")
    assert compute_etag("NONE") != compute_etag("MIGRATE_ON_HOST_MAINTENANCE")
    assert len(compute_etag("NONE")) == 16 and int(compute_etag("NONE"), 16) >= 0


def test_the_etag_does_not_depend_on_the_host_or_the_vm():
    # A guest that moved keeps a valid last_etag: same value, same ETag, anywhere.
    a = render(Snapshot("a", "1", "a"), P + "maintenance-event", {})
    b = render(Snapshot("b", "2", "b"), P + "maintenance-event", {})
    assert a.headers["ETag"] == b.headers["ETag"]
    # alt=json and alt=text of one value share the ETag (it is the content's).
    j = render(Snapshot("a", "1", "a"), P + "maintenance-event", {"alt": "json"})
    assert j.headers["ETag"] == a.headers["ETag"] and j.body == b'"NONE"'


def test_parse_request():
    r = parse_request([b"GET /computeMetadata/v1/instance/name?alt=json&x= HTTP/1.1",
                       b"Host: 169.254.169.254", b"metadata-flavor: Google"])
    assert (r.method, r.path, r.query) == ("GET", "/computeMetadata/v1/instance/name", {"alt": "json", "x": ""})
    assert r.headers["metadata-flavor"] == "Google"
    for bad in ([b"GET /x"], [b"GET x HTTP/1.1"], [b"GET /x HTTP/1.1", b"no colon"],
                [b"GET /x HTTP/1.1", b"Bad : space"], [b"GET /x SPDY/3"]):
        with pytest.raises(md.HttpError):
            parse_request(bad)


def test_upcoming_maintenance_has_gce_field_names():
    doc = upcoming_maintenance(1715871765.47, 1715886165.47, status="ONGOING")
    assert doc == {
        "can_reschedule": False,
        "latest_window_start_time": "2024-05-16T15:02:45.470Z",
        "maintenance_status": "ONGOING",
        "type": "SCHEDULED",
        "window_end_time": "2024-05-16T19:02:45.470Z",
        "window_start_time": "2024-05-16T15:02:45.470Z",
    }
    with pytest.raises(ValueError):
        upcoming_maintenance(0, 1, status="DONE")


# ---- answers -------------------------------------------------------------------------------

async def test_403_without_the_metadata_flavor_header():
    s = state()
    for headers in ({}, {"metadata-flavor": "google"}, {"metadata-flavor": "Google", "x-forwarded-for": "1.2.3.4"}):
        r = await answer(s, req(P + "maintenance-event", headers))
        assert r.status == 403
        assert "ETag" not in r.headers
        assert r.content_type.startswith("text/html")
    r = await answer(s, req(P + "maintenance-event", {}))
    assert b"Missing Metadata-Flavor:Google header." in r.body
    assert b"Error 403 (Forbidden)" in r.body


async def test_values():
    s = state()
    r = await answer(s, req(P + "maintenance-event"))
    assert (r.status, r.body, r.content_type) == (200, b"NONE", "application/text")
    assert r.headers["ETag"] == compute_etag(json.dumps("NONE"))
    assert (await answer(s, req(P + "name"))).body == b"vm1"
    assert (await answer(s, req(P + "id"))).body == b"4242"
    assert (await answer(s, req(P + "hostname"))).body == b"vm1"
    assert (await answer(s, req(P + "nope"))).status == 404
    assert (await answer(s, req("/other"))).status == 404
    assert (await answer(s, req(P + "name", method="POST"))).status == 405
    assert (await answer(s, req(P + "name", alt="xml"))).status == 400
    assert (await answer(s, req(P + "maintenance-event", timeout_sec="x", wait_for_change="true"))).status == 400
    listing = await answer(s, req(P))
    assert listing.body == b"hostname\nid\nmaintenance-event\nname\n"
    redirect = await answer(s, req(md.PREFIX + "instance"))
    assert redirect.status == 301 and redirect.headers["Location"] == P


async def test_upcoming_maintenance_404_then_json_and_recursive():
    s = state()
    assert (await answer(s, req(P + "upcoming-maintenance"))).status == 404
    doc = upcoming_maintenance(time.time() + 60, time.time() + 120)
    s.update(maintenance_event="MIGRATE_ON_HOST_MAINTENANCE", upcoming=doc)
    r = await answer(s, req(P + "upcoming-maintenance"))
    assert r.status == 200 and r.content_type == "application/json"
    assert json.loads(r.body) == doc
    text = (await answer(s, req(P + "upcoming-maintenance", alt="text"))).body.decode()
    assert "maintenance_status PENDING\n" in text and "can_reschedule false\n" in text
    everything = json.loads((await answer(s, req(P, recursive="true"))).body)
    assert everything == {"hostname": "vm1", "id": 4242, "maintenanceEvent": "MIGRATE_ON_HOST_MAINTENANCE",
                          "name": "vm1", "upcomingMaintenance": doc}


# ---- wait_for_change -----------------------------------------------------------------------

async def test_wait_with_a_stale_last_etag_answers_at_once():
    s = state()
    t0 = time.monotonic()
    r = await answer(s, req(P + "maintenance-event", wait_for_change="true", last_etag="0123456789abcdef"))
    assert r.body == b"NONE" and time.monotonic() - t0 < 0.1


async def test_wait_times_out_with_the_current_value():
    s = state()
    etag = (await answer(s, req(P + "maintenance-event"))).headers["ETag"]
    t0 = time.monotonic()
    r = await answer(s, req(P + "maintenance-event", wait_for_change="true", last_etag=etag, timeout_sec=1))
    assert (r.status, r.body, r.headers["ETag"]) == (200, b"NONE", etag)
    assert 0.9 < time.monotonic() - t0 < 1.5
    r = await answer(s, req(P + "maintenance-event", wait_for_change="true", timeout_sec=0))
    assert r.body == b"NONE"


@pytest.mark.parametrize("with_etag", [True, False])
async def test_wait_answers_when_the_value_changes(with_etag):
    s = state()
    etag = (await answer(s, req(P + "maintenance-event"))).headers["ETag"]
    q = {"wait_for_change": "true", "timeout_sec": 10, **({"last_etag": etag} if with_etag else {})}
    waiter = asyncio.ensure_future(answer(s, req(P + "maintenance-event", **q)))
    await asyncio.sleep(0.05)
    s.update(upcoming=None)                 # no change: keeps waiting
    s.update(vm_id="4242")
    await asyncio.sleep(0.05)
    assert not waiter.done()
    t0 = time.monotonic()
    s.update(maintenance_event="MIGRATE_ON_HOST_MAINTENANCE")
    r = await asyncio.wait_for(waiter, 1)
    assert time.monotonic() - t0 < 0.05
    assert r.body == b"MIGRATE_ON_HOST_MAINTENANCE" and r.headers["ETag"] != etag


async def test_a_change_that_is_undone_before_the_waiter_runs_is_still_reported():
    s = state()
    waiter = asyncio.ensure_future(answer(s, req(P + "maintenance-event", wait_for_change="true")))
    await asyncio.sleep(0.01)
    s.update(maintenance_event="TERMINATE_ON_HOST_MAINTENANCE")
    s.update(maintenance_event="NONE")
    assert (await asyncio.wait_for(waiter, 1)).body == b"TERMINATE_ON_HOST_MAINTENANCE"


async def test_other_keys_changing_do_not_wake_a_maintenance_waiter():
    s = state()
    waiter = asyncio.ensure_future(answer(s, req(P + "maintenance-event", wait_for_change="true", timeout_sec=1)))
    await asyncio.sleep(0.01)
    s.update(upcoming=upcoming_maintenance(0, 1))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert (await asyncio.wait_for(waiter, 2)).body == b"NONE"


async def test_waiting_for_upcoming_maintenance_to_appear():
    s = state()
    waiter = asyncio.ensure_future(answer(s, req(P + "upcoming-maintenance", wait_for_change="true")))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    s.update(upcoming=upcoming_maintenance(0, 1))
    r = await asyncio.wait_for(waiter, 1)
    assert r.status == 200 and json.loads(r.body)["type"] == "SCHEDULED"
    # ... and to go away again: the 404 answers a waiter that knew the document's ETag.
    waiter = asyncio.ensure_future(answer(s, req(P + "upcoming-maintenance", wait_for_change="true",
                                                 last_etag=r.headers["ETag"])))
    await asyncio.sleep(0.02)
    s.update(upcoming=None)
    assert (await asyncio.wait_for(waiter, 1)).status == 404


# ---- HTTP over a socket pair -------------------------------------------------------------------

async def _pair(s: VmState):
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_connection(sock=a)
    task = asyncio.ensure_future(serve_connection(s, sr, sw))
    cr, cw = await asyncio.open_connection(sock=b)
    return task, cr, cw


def _split(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}, body


async def test_http_response_carries_gce_headers():
    s = state()
    task, cr, cw = await _pair(s)
    cw.write(b"GET /computeMetadata/v1/instance/maintenance-event HTTP/1.1\r\n"
             b"Host: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n")
    status, headers, body = _split(await asyncio.wait_for(cr.read(), 2))
    await task
    assert status == "HTTP/1.1 200 OK" and body == b"NONE"
    assert headers["metadata-flavor"] == "Google"
    assert headers["etag"] == compute_etag('"NONE"')
    assert headers["content-type"] == "application/text"
    assert headers["content-length"] == "4" and headers["connection"] == "close"
    assert abs(float(headers["x-ferry-sent-at"]) - time.time()) < 2


async def test_http_403_without_header():
    task, cr, cw = await _pair(state())
    cw.write(b"GET /computeMetadata/v1/instance/maintenance-event HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = _split(await asyncio.wait_for(cr.read(), 2))
    await task
    assert status == "HTTP/1.1 403 Forbidden"
    assert headers["metadata-flavor"] == "Google"
    assert b"Missing Metadata-Flavor:Google header." in body


async def test_http_garbage_gets_400():
    task, cr, cw = await _pair(state())
    cw.write(b"HELLO\r\n\r\n")
    status, _, _ = _split(await asyncio.wait_for(cr.read(), 2))
    await task
    assert status == "HTTP/1.1 400 Bad Request"


async def test_a_client_that_half_closes_still_gets_its_answer():
    s = state()
    task, cr, cw = await _pair(s)
    cw.write(b"GET /computeMetadata/v1/instance/maintenance-event?wait_for_change=true HTTP/1.1\r\n"
             b"Metadata-Flavor: Google\r\n\r\n")
    cw.write_eof()                   # like `printf ... | nc`
    await asyncio.sleep(0.05)
    assert not task.done()
    s.update(maintenance_event="MIGRATE_ON_HOST_MAINTENANCE")
    _, _, body = _split(await asyncio.wait_for(cr.read(), 2))
    assert body == b"MIGRATE_ON_HOST_MAINTENANCE"
    await task


async def test_a_client_that_resets_ends_its_wait():
    s = state()
    finished = asyncio.get_running_loop().create_future()

    async def handler(r, w):
        await serve_connection(s, r, w)
        finished.set_result(time.monotonic())

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        c = socket.create_connection(server.sockets[0].getsockname()[:2])
        c.sendall(b"GET /computeMetadata/v1/instance/maintenance-event?wait_for_change=true HTTP/1.1\r\n"
                  b"Metadata-Flavor: Google\r\n\r\n")
        await asyncio.sleep(0.1)
        assert not finished.done()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t0 = time.monotonic()
        c.close()                                # RST
        assert await asyncio.wait_for(finished, 2) - t0 < 0.5
    finally:
        server.close()
        await server.wait_closed()


# ---- the service on a real device-bound socket (lo) -------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="SO_BINDTODEVICE needs CAP_NET_RAW")


async def _get(port: int, path: str, headers: bytes = b"Metadata-Flavor: Google\r\n") -> tuple[str, dict, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + headers + b"\r\n")
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return _split(data)


@needs_root
async def test_service_on_lo():
    svc = MetadataService("127.0.0.1", 0, domain="ferry.internal")
    await svc.add_vm("vm1", "lo", 7)
    assert svc.address("vm1") is None          # not started yet
    await svc.start()
    try:
        port = svc.address("vm1")[1]
        status, headers, body = await _get(port, P + "hostname")
        assert body == b"vm1.ferry.internal"
        status, _, _ = await _get(port, P + "name", b"")
        assert status.startswith("HTTP/1.1 403")

        etag = (await _get(port, P + "maintenance-event"))[1]["etag"]
        waiter = asyncio.ensure_future(
            _get(port, P + f"maintenance-event?wait_for_change=true&last_etag={etag}&timeout_sec=30"))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        t0 = time.monotonic()
        svc.set_maintenance_event("vm1", "MIGRATE_ON_HOST_MAINTENANCE", upcoming_maintenance(0, 1))
        _, _, body = await asyncio.wait_for(waiter, 2)
        assert body == b"MIGRATE_ON_HOST_MAINTENANCE" and time.monotonic() - t0 < 0.5
        assert svc.get_maintenance_event("vm1") == "MIGRATE_ON_HOST_MAINTENANCE"
        with pytest.raises(ValueError):
            svc.set_maintenance_event("vm1", "REBOOT")
        with pytest.raises(KeyError):
            svc.set_maintenance_event("nobody", "NONE")

        # add_vm again keeps the state and the listener
        await svc.add_vm("vm1", "lo", 7)
        assert svc.address("vm1")[1] == port
        assert svc.get_maintenance_event("vm1") == "MIGRATE_ON_HOST_MAINTENANCE"

        # remove_vm drops hanging requests and closes the listener
        etag = (await _get(port, P + "maintenance-event"))[1]["etag"]
        waiter = asyncio.ensure_future(_get(port, P + f"maintenance-event?wait_for_change=true&last_etag={etag}"))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(svc.remove_vm("vm1"), 2)
        _, _, body = await asyncio.wait_for(waiter, 2)
        assert body == b""
        with pytest.raises(ConnectionRefusedError):
            await _get(port, P + "name")
        await svc.remove_vm("vm1")              # idempotent
    finally:
        await svc.stop()


@needs_root
async def test_many_waiting_guests_one_change_each():
    svc = MetadataService("127.0.0.1", 0)
    await svc.start()
    try:
        await svc.add_vm("a", "lo", 1)
        port = svc.address("a")[1]
        waiters = [asyncio.ensure_future(_get(port, P + "maintenance-event?wait_for_change=true"))
                   for _ in range(40)]
        await asyncio.sleep(0.3)
        svc.set_maintenance_event("a", "TERMINATE_ON_HOST_MAINTENANCE")
        bodies = [b for _, _, b in await asyncio.wait_for(asyncio.gather(*waiters), 5)]
        assert bodies == [b"TERMINATE_ON_HOST_MAINTENANCE"] * 40
    finally:
        await svc.stop()


@needs_root
async def test_a_guest_with_too_many_connections_loses_half_closed_ones_first(monkeypatch):
    monkeypatch.setattr(md, "MAX_CONNECTIONS_PER_VM", 2)
    svc = MetadataService("127.0.0.1", 0)
    await svc.start()
    try:
        await svc.add_vm("a", "lo", 1)
        port = svc.address("a")[1]
        request = (P + "maintenance-event?wait_for_change=true").encode()
        conns = []
        for _ in range(2):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET " + request + b" HTTP/1.1\r\nMetadata-Flavor: Google\r\n\r\n")
            conns.append((r, w))
        await asyncio.sleep(0.2)
        # full, nobody half-closed: a third connection is closed at once
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r3.read(), 2) == b""
        # the first one half-closes: it is the one evicted for a newcomer
        conns[0][1].write_eof()
        await asyncio.sleep(0.2)
        waiter = asyncio.ensure_future(_get(port, P + "maintenance-event?wait_for_change=true"))
        assert await asyncio.wait_for(conns[0][0].read(), 2) == b""
        await asyncio.sleep(0.2)
        svc.set_maintenance_event("a", "MIGRATE_ON_HOST_MAINTENANCE")
        assert (await asyncio.wait_for(waiter, 2))[2] == b"MIGRATE_ON_HOST_MAINTENANCE"
        assert _split(await asyncio.wait_for(conns[1][0].read(), 2))[2] == b"MIGRATE_ON_HOST_MAINTENANCE"
        for _, w in conns:
            w.close()
        w3.close()
    finally:
        await svc.stop()

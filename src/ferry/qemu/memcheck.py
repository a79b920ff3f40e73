"""Page-by-page comparison of guest RAM on both ends of a migration.

`status: completed` is not proof that a migration worked: in verification
mode both ends dump guest RAM (`pmemsave`) while paused, each host reduces
its dump to one short digest per page, and the controller compares them.
Digests rather than dumps cross the network, so this works between real hosts.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ferry.qemu.session import QmpSession

PAGE = 4096
DIGEST_BYTES = 8
MIB = 1024 * 1024
# On the i440fx "pc" machine RAM above 3.5 GiB is mapped from 4 GiB upwards.
LOWMEM_LIMIT = 0xE0000000
HIGHMEM_START = 0x100000000


def ram_regions(memory_mib: int) -> list[tuple[int, int]]:
    """Guest-physical (start, size) ranges holding the guest's RAM."""
    size = memory_mib * MIB
    if size <= LOWMEM_LIMIT:
        return [(0, size)]
    return [(0, LOWMEM_LIMIT), (HIGHMEM_START, size - LOWMEM_LIMIT)]


def digest_file(path: Path) -> bytes:
    out = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(256 * PAGE):
            for off in range(0, len(chunk), PAGE):
                out += hashlib.blake2b(chunk[off:off + PAGE], digest_size=DIGEST_BYTES).digest()
    return bytes(out)


def differing_pages(a: bytes, b: bytes) -> list[int]:
    """Indices of pages whose digests differ; a length mismatch counts the extra pages."""
    n = min(len(a), len(b)) // DIGEST_BYTES
    diff = [i for i in range(n)
            if a[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] != b[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]]
    longer = max(len(a), len(b)) // DIGEST_BYTES
    return diff + list(range(n, longer))


async def page_digests(qmp: QmpSession, memory_mib: int, workdir: str) -> bytes:
    """Dump the (paused) guest's RAM and return one digest per page."""
    digests = bytearray()
    for start, size in ram_regions(memory_mib):
        fd, name = tempfile.mkstemp(prefix="ram-", suffix=".dump", dir=workdir)
        os.close(fd)
        try:
            await qmp.execute("pmemsave", {"val": start, "size": size, "filename": name}, timeout_s=120)
            digests += digest_file(Path(name))
        finally:
            os.unlink(name)
    return bytes(digests)

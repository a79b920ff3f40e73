"""The ferry guest image: a Debian cloud kernel plus a busybox initramfs.

The initramfs is the whole guest: `guest/init` as PID 1, static busybox, the
virtio-net modules, an httpd with a status CGI, an echo service on port 7 and
`memload`, a load generator that verifies every page it rewrites, so a
migration that loses or corrupts guest memory is caught inside the guest.

Build outputs (in `<cache>/guest/`): `vmlinuz`, `initrd.img`, `manifest.json`.
The kernel is unpacked with `dpkg -x` from the Debian package; nothing is
installed on the host.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import ipaddress
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
GUEST_SRC = REPO_ROOT / "guest"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
# Load order matters for busybox insmod (no dependency resolution).  Missing
# ones are built into the kernel (or do not exist in that version) and are skipped.
NET_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
               "virtio_pci", "failover", "net_failover", "virtio_net")
REQUIRED_MODULES = ("virtio", "virtio_pci", "virtio_net")  # must be a module or built in
MEMLOAD_CFLAGS = ("-O2", "-static", "-fno-tree-vectorize", "-Wall")
# Top-level guest/ files that go into the initramfs (and into the rebuild hash).
GUEST_SCRIPTS = ("init", "maintenance-watcher")

Log = Callable[[str], object]


class ImageBuildError(RuntimeError):
    """The guest image cannot be built; the message is one line for the user."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str


def default_cache_dir() -> Path:
    env = os.environ.get("FERRY_CACHE_DIR")
    return Path(env) if env else REPO_ROOT / ".cache"


def _guest_dir(cache_dir: Path | None) -> Path:
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # Accept the image directory itself as well as the cache root above it.
    if (base / "manifest.json").exists() and not (base / "guest").is_dir():
        return base
    return base / "guest"


def find_image(cache_dir: Path | None = None) -> GuestImage | None:
    """The built image, or None if it has not been built (completely) yet."""
    d = _guest_dir(cache_dir)
    kernel, initrd, manifest = d / "vmlinuz", d / "initrd.img", d / "manifest.json"
    if not (kernel.is_file() and initrd.is_file() and manifest.is_file()):
        return None
    try:
        version = json.loads(manifest.read_text())["kernel_version"]
    except (ValueError, KeyError):
        return None
    return GuestImage(kernel=kernel, initrd=initrd, kernel_version=version)


# ---- kernel command line ------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")


def kernel_cmdline(name: str, ip: str, gateway: str, memload_size_mib: int | None = None,
                   memload_rate_mib_s: int | None = None, pti: bool = True,
                   extra: str = "") -> str:
    """The guest kernel command line; `guest/init` reads the ferry.* keys."""
    if not _NAME_RE.match(name):
        raise ValueError(f"guest name {name!r} must be 1-63 characters of [A-Za-z0-9._-]")
    for what, addr in (("ip", ip), ("gateway", gateway)):
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            raise ValueError(f"guest {what} {addr!r} is not an IPv4 address") from None
    parts = [
        "console=ttyS0",
        # pti=on is load-bearing, not hardening: under TCG (QEMU 7.2), migrating
        # a guest that is writing memory silently corrupts 1-24 pages of guest
        # kernel memory in most runs unless the kernel boots with pti=on (0
        # corrupt runs of 13 with it; idle guests never corrupt).  Only tests
        # that demonstrate the corruption may pass pti=False.
        "pti=on" if pti else "pti=off",
        "panic=-1",          # reboot on panic; QEMU runs with -no-reboot, so it exits
        # quiet: a fast boot over the emulated UART.  Errors (oops, BUG, panic)
        # still print; init and memload write their markers to /dev/console.
        "quiet",
        "i8042.noaux", "i8042.nokbd", "i8042.nopnp",  # no PS/2 probing delays
    ]
    parts += [f"ferry.name={name}", f"ferry.ip={ip}", f"ferry.gw={gateway}"]
    if memload_size_mib is not None:
        rate = memload_rate_mib_s or 0
        if memload_size_mib <= 0 or rate < 0:
            raise ValueError("memload size must be > 0 MiB and rate >= 0 MiB/s")
        parts.append(f"ferry.memload={int(memload_size_mib)}:{int(rate)}")
    elif memload_rate_mib_s is not None:
        raise ValueError("memload rate given without a memload size")
    if extra.strip():
        parts.append(extra.strip())
    return " ".join(parts)


# ---- building -----------------------------------------------------------------------------

def build_image(cache_dir: Path | None = None, force: bool = False,
                log: Log = print) -> GuestImage:
    """Build (or reuse) the guest kernel and initramfs; idempotent unless force."""
    t0 = time.monotonic()
    _check_tools()
    d = _guest_dir(cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    with _lock(d / ".lock"):
        kroot = d / "kernel-root"
        if force or _kernel_file(kroot) is None:
            _fetch_kernel(kroot, log)
        vmlinuz = _kernel_file(kroot)
        if vmlinuz is None:
            raise ImageBuildError(f"no boot/vmlinuz-* in {kroot} after unpacking the kernel package")
        version = vmlinuz.name.removeprefix("vmlinuz-")

        memload = d / "build" / "memload"
        _compile(GUEST_SRC / "memload.c", memload, force, log)

        modules = _modules(kroot, version, d / "build" / "modules", log)
        inputs = _inputs_digest(vmlinuz, memload, modules)
        manifest_path = d / "manifest.json"
        old = _read_json(manifest_path)
        image = GuestImage(kernel=d / "vmlinuz", initrd=d / "initrd.img", kernel_version=version)
        if (not force and old.get("inputs_sha256") == inputs
                and image.kernel.is_file() and image.initrd.is_file()):
            log(f"guest image up to date: {d} (kernel {version})")
            return image

        _atomic_write(image.kernel, vmlinuz.read_bytes())
        _atomic_write(image.initrd, _initramfs(memload, modules))
        manifest = {
            "kernel_version": version,
            "kernel_package": f"linux-image-{version}",
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "modules": [m.stem for m in modules],
            "kernel_bytes": image.kernel.stat().st_size,
            "initrd_bytes": image.initrd.stat().st_size,
            "inputs_sha256": inputs,
        }
        _atomic_write(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
        log(f"guest image built in {time.monotonic() - t0:.1f}s: {d} (kernel {version}, "
            f"initrd {manifest['initrd_bytes'] // 1024} KiB)")
        return image


def _check_tools() -> None:
    for tool, why in (("apt-get", "to download the guest kernel"),
                      ("apt-cache", "to resolve the guest kernel package"),
                      ("dpkg", "to unpack the guest kernel package"),
                      ("gcc", "to compile memload (apt-get install gcc libc6-dev)")):
        if shutil.which(tool) is None:
            raise ImageBuildError(f"`{tool}` not found; it is needed {why}")
    if not BUSYBOX.is_file():
        raise ImageBuildError(f"{BUSYBOX} not found; install busybox-static")
    # A dynamic busybox would need a libc in the initramfs (no ELF interpreter = static).
    if b"/ld-linux" in BUSYBOX.read_bytes()[:4096]:
        raise ImageBuildError(f"{BUSYBOX} is not statically linked; install busybox-static")


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    # Concurrent builds (parallel tests, two agents) would race on the outputs.
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(argv: list[str], check: bool = True, cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ImageBuildError(f"`{argv[0]}` not found") from None
    if check and p.returncode != 0:
        detail = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise ImageBuildError(f"`{' '.join(argv)}` failed: {detail[-1] if detail else p.returncode}")
    return p.stdout


def _kernel_file(kroot: Path) -> Path | None:
    found = sorted((kroot / "boot").glob("vmlinuz-*"))
    return found[-1] if found else None


def _resolve_kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE], check=False)
    # The metapackage depends on the real, versioned package.
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", out)
    return m.group(1) if m else ""


def _fetch_kernel(kroot: Path, log: Log) -> None:
    pkg = _resolve_kernel_package()
    if not pkg:
        log("apt lists missing or stale: running apt-get update")
        _run(["apt-get", "update"])
        pkg = _resolve_kernel_package()
        if not pkg:
            raise ImageBuildError(f"cannot resolve {KERNEL_METAPACKAGE} to a kernel package "
                                  "(is a Debian archive in the apt sources?)")
    log(f"downloading {pkg}")
    with tempfile.TemporaryDirectory(prefix="ferry-kernel-") as tmp:
        # apt drops privileges to _apt for downloads; it must be able to write here.
        os.chmod(tmp, 0o777)
        argv = ["apt-get", "download", KERNEL_METAPACKAGE, pkg]
        p = subprocess.run(argv, cwd=tmp, capture_output=True, text=True)
        if p.returncode != 0:
            log("apt-get download failed: running apt-get update and retrying")
            _run(["apt-get", "update"])
            _run(argv, cwd=Path(tmp))
        debs = sorted(Path(tmp).glob(f"{pkg}_*.deb"))
        if not debs:
            raise ImageBuildError(f"apt-get download produced no {pkg}_*.deb")
        staging = kroot.with_name(kroot.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        _run(["dpkg", "-x", str(debs[0]), str(staging)])
        shutil.rmtree(kroot, ignore_errors=True)
        staging.rename(kroot)


def _compile(src: Path, out: Path, force: bool, log: Log) -> None:
    if not force and out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"compiling {src.name}")
    tmp = out.with_suffix(".tmp")
    _run(["gcc", *MEMLOAD_CFLAGS, "-o", str(tmp), str(src)])
    tmp.rename(out)


def _modules(kroot: Path, version: str, outdir: Path, log: Log) -> list[Path]:
    """The net modules that exist for this kernel, decompressed, in load order."""
    mdir = kroot / "lib" / "modules" / version
    builtin_file = mdir / "modules.builtin"
    builtin = {Path(line).name.split(".ko")[0] for line in
               (builtin_file.read_text().split() if builtin_file.exists() else [])}
    index: dict[str, Path] = {}
    for path in (mdir / "kernel").rglob("*.ko*"):
        index.setdefault(path.name.split(".ko")[0], path)
    outdir.mkdir(parents=True, exist_ok=True)
    result = []
    for name in NET_MODULES:
        path = index.get(name) or index.get(name.replace("_", "-"))
        if path is None:
            if name in REQUIRED_MODULES and name not in builtin:
                raise ImageBuildError(f"kernel {version} has no {name} module and it is not built in")
            continue
        out = outdir / f"{name}.ko"
        if not out.exists() or out.stat().st_mtime < path.stat().st_mtime:
            # busybox insmod cannot read compressed modules: decompress at build time.
            _atomic_write(out, _decompress(path))
        result.append(out)
    log(f"modules: {' '.join(p.stem for p in result)}")
    return result


def _decompress(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise ImageBuildError(f"{path.name} is zstd-compressed: install zstd")
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def _guest_files() -> list[Path]:
    return sorted(p for p in GUEST_SRC.rglob("*") if p.is_file()
                  and ((p.parent == GUEST_SRC and p.name in GUEST_SCRIPTS)
                       or p.parts[len(GUEST_SRC.parts)] == "www"))


def _inputs_digest(vmlinuz: Path, memload: Path, modules: list[Path]) -> str:
    h = hashlib.sha256()
    for p in [vmlinuz, memload, BUSYBOX, *modules, *_guest_files()]:
        h.update(str(p).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---- initramfs (newc cpio, gzip) -----------------------------------------------------------

class _Cpio:
    """A minimal newc writer: lets us make /dev/console without root or cpio(1)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        return self.buf.getvalue()


def _initramfs(memload: Path, modules: list[Path]) -> bytes:
    c = _Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp",
              "etc", "root", "lib", "lib/ferry-modules", "www"):
        c.dir(d)
    # The kernel opens /dev/console for init before anything can mount devtmpfs.
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    # Applet links made here rather than `busybox --install` at boot: boot is slow under TCG.
    for applet in _run([str(BUSYBOX), "--list-full"]).split():
        if applet != "bin/busybox":
            c.symlink(applet, "/bin/busybox")
    c.file("bin/memload", memload.read_bytes(), 0o755)
    c.file("init", (GUEST_SRC / "init").read_bytes(), 0o755)
    c.file("bin/maintenance-watcher", (GUEST_SRC / "maintenance-watcher").read_bytes(), 0o755)
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    c.file("etc/group", b"root:x:0:\n")
    for m in modules:
        c.file(f"lib/ferry-modules/{m.name}", m.read_bytes())
    www = GUEST_SRC / "www"
    for p in sorted(www.rglob("*")):
        rel = "www/" + p.relative_to(www).as_posix()
        if p.is_dir():
            c.dir(rel)
        else:
            c.file(rel, p.read_bytes(), 0o755 if os.access(p, os.X_OK) else 0o644)
    # mtime=0: the same inputs give the same bytes.
    return gzip.compress(c.finish(), compresslevel=6, mtime=0)

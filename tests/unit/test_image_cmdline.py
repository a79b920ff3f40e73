"""The guest kernel command line: pure string building, no QEMU."""
import pytest

from ferry.qemu.image import kernel_cmdline


def keys(cmdline: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in cmdline.split() if "=" in p)


def test_pti_on_by_default():
    # pti=on prevents guest kernel memory corruption on migration under TCG.
    cmd = kernel_cmdline("vm1", "10.0.0.5", "10.0.0.1")
    assert "pti=on" in cmd.split()
    assert "pti=off" not in cmd


def test_pti_off_only_on_request():
    cmd = kernel_cmdline("vm1", "10.0.0.5", "10.0.0.1", pti=False)
    assert "pti=off" in cmd.split() and "pti=on" not in cmd.split()


def test_ferry_keys_and_console():
    k = keys(kernel_cmdline("vm-1.a_b", "10.0.0.5", "10.0.0.1"))
    assert k["console"] == "ttyS0"
    assert k["panic"] == "-1"
    assert k["ferry.name"] == "vm-1.a_b"
    assert k["ferry.ip"] == "10.0.0.5"
    assert k["ferry.gw"] == "10.0.0.1"
    assert "ferry.memload" not in k


def test_memload_optional():
    assert keys(kernel_cmdline("a", "10.0.0.5", "10.0.0.1", 128, 100))["ferry.memload"] == "128:100"
    assert keys(kernel_cmdline("a", "10.0.0.5", "10.0.0.1", 64))["ferry.memload"] == "64:0"
    assert keys(kernel_cmdline("a", "10.0.0.5", "10.0.0.1", 64, 0))["ferry.memload"] == "64:0"


def test_extra_appended_last():
    cmd = kernel_cmdline("a", "10.0.0.5", "10.0.0.1", extra=" nokaslr ")
    assert cmd.endswith(" nokaslr")


@pytest.mark.parametrize("args", [
    ("bad name", "10.0.0.5", "10.0.0.1"),
    ("", "10.0.0.5", "10.0.0.1"),
    ("a", "10.0.0", "10.0.0.1"),
    ("a", "10.0.0.5", "gw"),
])
def test_rejects_bad_values(args):
    with pytest.raises(ValueError):
        kernel_cmdline(*args)


def test_rejects_rate_without_size_and_bad_sizes():
    with pytest.raises(ValueError):
        kernel_cmdline("a", "10.0.0.5", "10.0.0.1", memload_rate_mib_s=10)
    with pytest.raises(ValueError):
        kernel_cmdline("a", "10.0.0.5", "10.0.0.1", memload_size_mib=0)
    with pytest.raises(ValueError):
        kernel_cmdline("a", "10.0.0.5", "10.0.0.1", memload_size_mib=8, memload_rate_mib_s=-1)

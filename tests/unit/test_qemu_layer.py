from pathlib import Path

from ferry.agent.vms import guest_cmdline
from ferry.model import InstanceSpec, Workload
from ferry.qemu.launch import LaunchSpec, qemu_argv
from ferry.qemu.memcheck import DIGEST_BYTES, differing_pages, digest_file, ram_regions
from ferry.qemu.migration import MigrationSettings, capabilities_arg, incoming_port, parse_query_migrate


def spec(**kw) -> LaunchSpec:
    base = dict(name="web-1", memory_mib=512, vcpus=2, kernel="/k", initrd="/i", cmdline="console=ttyS0",
                mac="52:54:00:00:00:01", tap="ftabc", run_dir="/run/x")
    return LaunchSpec(**{**base, **kw})


def test_argv_has_machine_accel_nic_and_daemon_bits():
    argv = qemu_argv(spec())
    joined = " ".join(argv)
    assert "-machine pc-i440fx-7.2,accel=tcg" in joined
    assert "-m 512" in joined and "-smp 2" in joined
    assert "tap,id=net0,ifname=ftabc,script=no,downscript=no" in joined
    assert "mac=52:54:00:00:00:01" in joined
    assert "-daemonize" in argv and "-pidfile" in argv
    assert "-incoming" not in argv and "-S" not in argv


def test_argv_for_a_paused_incoming_target_on_kvm():
    argv = qemu_argv(spec(incoming=True, start_paused=True, accel="kvm"))
    assert argv[argv.index("-incoming") + 1] == "defer"
    assert "-S" in argv and "pc-i440fx-7.2,accel=kvm" in argv


def test_every_guest_the_agent_launches_boots_with_pti_on():
    for workload in (Workload(), Workload("memload", 100), Workload("memload", 800, 300)):
        cmdline = guest_cmdline("web-1", "10.200.0.10", InstanceSpec(512, 1, workload))
        assert "pti=on" in cmdline.split()
        assert "ferry.ip=10.200.0.10" in cmdline


def test_query_migrate_parsing():
    s = parse_query_migrate({"status": "active", "total-time": 900, "expected-downtime": 12,
                             "ram": {"transferred": 100, "remaining": 50, "total": 200,
                                     "dirty-pages-rate": 25600, "dirty-sync-count": 3, "page-size": 4096,
                                     "mbps": 812.5}})
    assert s.status == "active" and not s.finished
    assert s.dirty_rate_mib_s == 100.0
    assert s.to_dict()["dirty_rate_mib_s"] == 100.0
    assert parse_query_migrate({"status": "completed"}).finished


def test_settings_and_capabilities():
    st = MigrationSettings(max_bandwidth_mib_s=10, downtime_limit_ms=20, capabilities={"events": True, "xbzrle": False})
    assert st.parameters() == {"max-bandwidth": 10 * 1024 * 1024, "downtime-limit": 20}
    assert capabilities_arg(st.capabilities) == [{"capability": "events", "state": True},
                                                 {"capability": "xbzrle", "state": False}]


def test_incoming_port():
    assert incoming_port({"socket-address": [{"type": "inet", "host": "10.0.0.1", "port": "4444"}]}) == 4444
    assert incoming_port({}) is None


def test_ram_regions_split_at_the_pci_hole():
    assert ram_regions(512) == [(0, 512 << 20)]
    low, high = ram_regions(4096)
    assert low == (0, 0xE0000000) and high == (0x100000000, (4096 << 20) - 0xE0000000)


def test_page_digests_find_the_differing_page(tmp_path: Path):
    a = bytearray(4096 * 8)
    b = bytearray(a)
    b[4096 * 5 + 17] = 1
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    da, db = digest_file(tmp_path / "a"), digest_file(tmp_path / "b")
    assert len(da) == 8 * DIGEST_BYTES
    assert differing_pages(da, db) == [5]
    assert differing_pages(da, da) == []
    assert differing_pages(da, db[:-DIGEST_BYTES]) == [5, 7]

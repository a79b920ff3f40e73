"""`ferry lab down` leaves nothing behind; `lab up` copes with what a crashed lab left."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from ferry.lab.lab import down, lab_state, read_lab, running_pids, up
from ferry.lab.processes import alive
from tests.e2e.conftest import make_lab

pytestmark = pytest.mark.e2e


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]


def test_lab_down_leaves_no_namespace_process_or_file(tmp_path):
    lab = make_lab(tmp_path, "ftdown", 18788, hosts=2, host_memory=1024)
    lab.create_vm("tmp-1", host="host-1", workload="memload:rate=10")
    qemu_pid = lab.api.get("/v1/vms/tmp-1")["agent"]["pid"]
    assert len(namespaces("ftdown")) == 4 and running_pids(lab.cfg)
    lab.ferry("lab", "down")
    assert namespaces("ftdown") == []
    assert running_pids(lab.cfg) == []
    assert not alive(qemu_pid)
    assert not lab.cfg.state_dir.exists()
    again = lab.ferry("lab", "down")          # safe to run twice
    assert again.returncode == 0


def test_lab_up_clears_a_crashed_lab(tmp_path):
    lab = make_lab(tmp_path, "ftcrash", 18789, hosts=1, host_memory=1024)
    info = read_lab(lab.cfg)
    for pid in [info["controller"]["pid"]] + [h["pid"] for h in info["hosts"]]:
        os.kill(pid, signal.SIGKILL)       # a crash: nothing cleaned up
    assert lab_state(lab.cfg) == "stale" and namespaces("ftcrash")
    messages: list[str] = []
    up(lab.cfg, log=messages.append)
    try:
        assert any("leftovers" in m for m in messages)
        assert lab_state(lab.cfg) == "running"
        assert [h["name"] for h in lab.api.get("/v1/hosts")] == ["host-1"]
    finally:
        down(lab.cfg, log=lambda m: None)
    assert namespaces("ftcrash") == []

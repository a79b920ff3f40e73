from pathlib import Path

import pytest

from ferry.controller.config import load_config
from ferry.model import InvalidInput, Migration, Phase
from ferry.store import SqliteStore
from tests.unit.fleet import event, host, vm


def test_sqlite_store_round_trips_and_transactions_roll_back(tmp_path: Path):
    store = SqliteStore(tmp_path / "f.db")
    store.put_host(host("a"))
    store.put_instance(vm("v", "a"))
    m = Migration(id="m1", vm="v", source="a", target="b", created_at=2.0)
    m.enter(Phase.PENDING, 2.0)
    store.put_migration(m)
    store.put_event(event("e1", ["a"]))
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.delete_instance("v")
            raise RuntimeError("boom")
    again = SqliteStore(tmp_path / "f.db")
    assert again.get_host("a") == host("a")
    assert again.get_instance("v") == vm("v", "a")
    assert again.list_migrations("v")[0] == m
    assert again.get_event("e1") == event("e1", ["a"])
    assert again.get_host("zz") is None


def test_controller_config(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text("[planner]\nnotice_period_s = 2\nmax_draining_fleet = 1\n[health]\necc_threshold = 5\n")
    cfg = load_config(f)
    assert cfg.planner.notice_period_s == 2 and cfg.planner.max_draining_fleet == 1 and cfg.health.ecc_threshold == 5
    f.write_text("[planner]\nnotice = 2\n")
    with pytest.raises(InvalidInput, match="unknown keys: notice"):
        load_config(f)

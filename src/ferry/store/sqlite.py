"""SQLite store: one file, nothing to install. Documents as JSON, keys as columns."""
from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ferry.model import Host, Instance, MaintenanceEvent, Migration

SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (name TEXT PRIMARY KEY, host TEXT, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY, vm TEXT NOT NULL, phase TEXT NOT NULL, created_at REAL NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS migrations_vm ON migrations (vm);
CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, created_at REAL NOT NULL, doc TEXT NOT NULL);
"""


class SqliteStore:
    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()
        self._depth = 0

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._db.execute("COMMIT")

    def _write(self, sql: str, args: tuple) -> None:
        with self.transaction():
            self._db.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute(sql, args)]

    # hosts
    def put_host(self, host: Host) -> None:
        self._write("INSERT OR REPLACE INTO hosts VALUES (?, ?)", (host.name, json.dumps(host.to_dict())))

    def get_host(self, name: str) -> Host | None:
        rows = self._read("SELECT doc FROM hosts WHERE name = ?", (name,))
        return Host.from_dict(json.loads(rows[0])) if rows else None

    def list_hosts(self) -> list[Host]:
        return [Host.from_dict(json.loads(d)) for d in self._read("SELECT doc FROM hosts ORDER BY name")]

    def delete_host(self, name: str) -> None:
        self._write("DELETE FROM hosts WHERE name = ?", (name,))

    # instances
    def put_instance(self, instance: Instance) -> None:
        self._write("INSERT OR REPLACE INTO instances VALUES (?, ?, ?)",
                    (instance.name, instance.host, json.dumps(instance.to_dict())))

    def get_instance(self, name: str) -> Instance | None:
        rows = self._read("SELECT doc FROM instances WHERE name = ?", (name,))
        return Instance.from_dict(json.loads(rows[0])) if rows else None

    def list_instances(self) -> list[Instance]:
        return [Instance.from_dict(json.loads(d)) for d in self._read("SELECT doc FROM instances ORDER BY name")]

    def delete_instance(self, name: str) -> None:
        self._write("DELETE FROM instances WHERE name = ?", (name,))

    # migrations
    def put_migration(self, migration: Migration) -> None:
        self._write("INSERT OR REPLACE INTO migrations VALUES (?, ?, ?, ?, ?)",
                    (migration.id, migration.vm, migration.phase.value, migration.created_at,
                     json.dumps(migration.to_dict())))

    def get_migration(self, migration_id: str) -> Migration | None:
        rows = self._read("SELECT doc FROM migrations WHERE id = ?", (migration_id,))
        return Migration.from_dict(json.loads(rows[0])) if rows else None

    def list_migrations(self, vm: str | None = None) -> list[Migration]:
        if vm is None:
            docs = self._read("SELECT doc FROM migrations ORDER BY created_at")
        else:
            docs = self._read("SELECT doc FROM migrations WHERE vm = ? ORDER BY created_at", (vm,))
        return [Migration.from_dict(json.loads(d)) for d in docs]

    # maintenance events
    def put_event(self, event: MaintenanceEvent) -> None:
        self._write("INSERT OR REPLACE INTO events VALUES (?, ?, ?)",
                    (event.id, event.created_at, json.dumps(event.to_dict())))

    def get_event(self, event_id: str) -> MaintenanceEvent | None:
        rows = self._read("SELECT doc FROM events WHERE id = ?", (event_id,))
        return MaintenanceEvent.from_dict(json.loads(rows[0])) if rows else None

    def list_events(self) -> list[MaintenanceEvent]:
        return [MaintenanceEvent.from_dict(json.loads(d)) for d in self._read("SELECT doc FROM events ORDER BY created_at")]

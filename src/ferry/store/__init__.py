"""Persistence of the controller's state behind one interface."""
from ferry.store.base import Store
from ferry.store.sqlite import SqliteStore

__all__ = ["Store", "SqliteStore"]

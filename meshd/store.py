"""meshd's embedded state store: SQLite in the state volume, so state survives a meshd restart."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any


class Store:
    """A small key/value store over SQLite; values are JSON. Safe to call from several threads."""

    def __init__(self, path: str):
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, key: str, default: Any = None) -> Any:
        """The stored value of `key`, or `default`."""
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        """Store `value` under `key`, durably."""
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
        with self._lock:
            self._db.execute("INSERT INTO kv(key, value) VALUES(?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, text))

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

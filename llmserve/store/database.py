"""The data directory's SQLite database and file folder.

Layout: ``DATA_DIR/llmserve.db`` (+ its ``-wal`` and ``-shm``) and ``DATA_DIR/files/<file id>``.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``: every commit is written
to the WAL before it returns, so a killed process (SIGKILL, a crash) loses nothing committed and
never leaves a torn row; only a power cut may lose the last commits (SQLite's documented
trade-off for WAL + NORMAL), still without corruption. A file's content is written to a
temporary name and renamed into place before its row is committed, so a row always names a
complete file; leftovers of a write cut short are removed when the store opens.

One writer: one connection, used under a lock (the event loop and the upload threads share it).
The schema is versioned with ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes it from version i
to i + 1, each in one transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

DB_NAME = "llmserve.db"
FILES_DIR = "files"
_TMP_PREFIX = ".tmp-"

MIGRATIONS: tuple[str, ...] = (
    # 0 → 1
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL,
        background INTEGER NOT NULL,
        body TEXT NOT NULL,          -- the response object as the API returns it
        input_items TEXT NOT NULL,   -- this turn's input items (GET .../input_items)
        context TEXT NOT NULL        -- the whole conversation up to and with the output
    );
    CREATE INDEX responses_status ON responses(status);
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        purpose TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX batches_status ON batches(status);
    -- a batch's input lines, copied at creation so deleting the input file cannot stop it
    CREATE TABLE batch_inputs (
        batch_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        custom_id TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (batch_id, line)
    );
    -- one row per finished line, written once: a line with a row never runs again
    CREATE TABLE batch_results (
        batch_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        ok INTEGER NOT NULL,
        body TEXT NOT NULL,          -- the output (or error) file's line
        PRIMARY KEY (batch_id, line)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("llmserve", appauthor=False))


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]
    input_items: list[dict[str, Any]]
    context: list[dict[str, Any]]


class Store:
    """Everything kept across restarts. Thread-safe (one connection under a lock)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.files_dir = data_dir / FILES_DIR
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data_dir / DB_NAME, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        self._remove_leftovers()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.data_dir / DB_NAME} has schema version {version}, newer than this "
                f"llmserve's {SCHEMA_VERSION}: upgrade llmserve or use another --data-dir")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._write() as db:
                db.executescript_in_txn(MIGRATIONS[target - 1])
                db.execute(f"PRAGMA user_version={target}")

    def _remove_leftovers(self) -> None:
        """Temporary files of writes cut short, and contents whose row was never committed."""
        known = {row[0] for row in self._read("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name.startswith(_TMP_PREFIX) or path.name not in known:
                path.unlink(missing_ok=True)

    @contextmanager
    def _write(self) -> Iterator[_Txn]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Txn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, tuple(args)))

    # -- responses ----------------------------------------------------------------------------

    def put_response(self, body: dict[str, Any], input_items: list[dict[str, Any]],
                     context: list[dict[str, Any]]) -> None:
        """Insert or replace a response (a background one is written again as it finishes)."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                (body["id"], body["created_at"], body["status"], int(bool(body["background"])),
                 _dump(body), _dump(input_items), _dump(context)),
            )

    def get_response(self, response_id: str) -> StoredResponse | None:
        rows = self._read("SELECT body, input_items, context FROM responses WHERE id = ?",
                          (response_id,))
        if not rows:
            return None
        body, items, context = rows[0]
        return StoredResponse(json.loads(body), json.loads(items), json.loads(context))

    def delete_response(self, response_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def responses_with_status(self, *statuses: str) -> list[StoredResponse]:
        marks = ",".join("?" * len(statuses))
        rows = self._read(f"SELECT id FROM responses WHERE status IN ({marks})", statuses)
        found = (self.get_response(row[0]) for row in rows)
        return [r for r in found if r is not None]

    # -- files --------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def write_file(self, body: dict[str, Any], source: BinaryIO | Iterable[bytes]) -> int:
        """Copy ``source`` into the file ``body["id"]`` (atomically: a temporary name, fsync,
        rename), then commit its row with ``bytes`` set to the size written. Returns it."""
        file_id = body["id"]
        tmp = self.files_dir / f"{_TMP_PREFIX}{file_id}"
        size = 0
        with open(tmp, "wb") as out:
            chunks = iter(lambda: source.read(1 << 20), b"") if hasattr(source, "read") \
                else source
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.file_path(file_id))
        body = {**body, "bytes": size}
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                       (file_id, body["created_at"], body["purpose"], _dump(body)))
        return size

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT body FROM files WHERE id = ?", (file_id,))
        return json.loads(rows[0][0]) if rows else None

    def list_files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        if purpose is None:
            rows = self._read("SELECT body FROM files ORDER BY created_at DESC, id")
        else:
            rows = self._read("SELECT body FROM files WHERE purpose = ? "
                              "ORDER BY created_at DESC, id", (purpose,))
        return [json.loads(row[0]) for row in rows]

    def delete_file(self, file_id: str) -> bool:
        with self._write() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)
        return deleted

    # -- batches ------------------------------------------------------------------------------

    def put_batch(self, body: dict[str, Any],
                  lines: Iterable[tuple[int, str, dict[str, Any]]] = ()) -> None:
        """Insert or update a batch; ``lines`` (line number, custom_id, request body) are its
        input lines, given once, when it is created."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?)",
                       (body["id"], body["created_at"], body["status"], _dump(body)))
            db.executemany("INSERT INTO batch_inputs VALUES (?, ?, ?, ?)",
                           [(body["id"], n, cid, _dump(b)) for n, cid, b in lines])

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT body FROM batches WHERE id = ?", (batch_id,))
        return json.loads(rows[0][0]) if rows else None

    def list_batches(self) -> list[dict[str, Any]]:
        rows = self._read("SELECT body FROM batches ORDER BY created_at DESC, id")
        return [json.loads(row[0]) for row in rows]

    def batches_with_status(self, *statuses: str) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(statuses))
        rows = self._read(f"SELECT body FROM batches WHERE status IN ({marks}) "
                          "ORDER BY created_at, id", statuses)
        return [json.loads(row[0]) for row in rows]

    def unfinished_lines(self, batch_id: str) -> list[tuple[int, str, dict[str, Any]]]:
        """The input lines without a result, in order."""
        rows = self._read(
            "SELECT i.line, i.custom_id, i.body FROM batch_inputs i WHERE i.batch_id = ? AND "
            "NOT EXISTS (SELECT 1 FROM batch_results r WHERE r.batch_id = i.batch_id AND "
            "r.line = i.line) ORDER BY i.line", (batch_id,))
        return [(n, cid, json.loads(body)) for n, cid, body in rows]

    def record_line(self, batch: dict[str, Any], line: int, ok: bool,
                    result: dict[str, Any]) -> None:
        """A line's result and the batch's new counts, in one transaction. A line already
        recorded raises sqlite3.IntegrityError (it must never run twice)."""
        with self._write() as db:
            db.execute("INSERT INTO batch_results VALUES (?, ?, ?, ?)",
                       (batch["id"], line, int(ok), _dump(result)))
            db.execute("UPDATE batches SET status = ?, body = ? WHERE id = ?",
                       (batch["status"], _dump(batch), batch["id"]))

    def line_results(self, batch_id: str, ok: bool) -> Iterator[str]:
        """The finished lines' output (``ok``) or error lines, in input order, as JSON text."""
        for (body,) in self._read("SELECT body FROM batch_results WHERE batch_id = ? AND "
                                  "ok = ? ORDER BY line", (batch_id, int(ok))):
            yield body

    def result_counts(self, batch_id: str) -> tuple[int, int]:
        """(completed, failed) lines so far."""
        rows = self._read("SELECT ok, COUNT(*) FROM batch_results WHERE batch_id = ? "
                          "GROUP BY ok", (batch_id,))
        counts = dict(rows)
        return counts.get(1, 0), counts.get(0, 0)


class _Txn:
    """The connection inside one write transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, tuple(args))

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self._db.executemany(sql, rows)

    def executescript_in_txn(self, script: str) -> None:
        """``executescript`` would COMMIT first; run the statements one by one instead."""
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

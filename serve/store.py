"""What the service keeps on disk, under its state directory, so that a restart loses nothing.

::

    STATE/jobs.sqlite3          the job table (stdlib sqlite3, WAL journal)
    STATE/jobs/ID/content.img   the uploaded bytes, as received (decoded again on resume: same digest)
    STATE/jobs/ID/style-N.img
    STATE/jobs/ID/checkpoint.pt the running job's state, every few steps and when the service stops
    STATE/jobs/ID/result.png    8-bit and 16-bit results, written once the job is done
    STATE/jobs/ID/result16.png
    STATE/incoming/             a job's files while its request is checked; renamed into jobs/ when accepted

Every path is built here from a job id the service made itself (checked against ``ID_PATTERN``); nothing a
client sends ever becomes part of a path.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

# 128 random bits: ids cannot be guessed, so a result is only reachable by whoever created the job.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{22}$")
# The states a job can be in on disk. "queued" and "running" are resumed on restart; the rest are final.
FINAL = ("done", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,          -- submission order, kept on restart
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    options TEXT NOT NULL,         -- JSON: the job's Config fields as the client gave them
    inputs TEXT NOT NULL,          -- JSON: {"content": name, "styles": [names]} as shown to the client
    styles INTEGER NOT NULL,
    error TEXT,
    progress TEXT,                 -- JSON: the latest progress event
    history TEXT,                  -- JSON: the loss curve so far, [[total_step, loss], ...]
    seconds REAL,
    resumed INTEGER NOT NULL DEFAULT 0
)
"""


def new_id() -> str:
    return secrets.token_urlsafe(16)


@dataclass
class Row:
    id: str
    seq: int
    state: str
    created: float
    updated: float
    options: dict
    inputs: dict
    styles: int
    error: Optional[str] = None
    progress: Optional[dict] = None
    history: list = field(default_factory=list)
    seconds: Optional[float] = None
    resumed: int = 0


class Store:
    """The job table and the job folders. Thread-safe: one connection behind a lock."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.incoming = self.root / "incoming"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        # Anything here is a request that never finished (the process died while checking it): not a job.
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
        self._db.execute(SCHEMA)
        self._remove_orphans()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Folders ---------------------------------------------------------------------------------------------

    def folder(self, job_id: str) -> Path:
        if not ID_PATTERN.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")  # never reached from a request: ids come from the table
        return self.jobs_dir / job_id

    def staging(self) -> Path:
        """A fresh folder for a request's files; ``accept`` moves it into place, ``discard`` removes it."""
        path = self.incoming / new_id()
        path.mkdir()
        return path

    def accept(self, staging: Path, row: Row) -> None:
        """Publish a checked request: its folder under jobs/, then its row (a folder without a row is removed
        on the next start)."""
        staging.rename(self.folder(row.id))
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, seq, state, created, updated, options, inputs, styles) "
                "VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?, ?, ?, ?, ?, ?)",
                (
                    row.id,
                    row.state,
                    row.created,
                    row.updated,
                    json.dumps(row.options),
                    json.dumps(row.inputs),
                    row.styles,
                ),
            )

    def forget(self, job_id: str) -> None:
        """Undo ``accept`` (the engine refused the job): no row, no folder."""
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    @staticmethod
    def discard(staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def _remove_orphans(self) -> None:
        known = {r[0] for r in self._db.execute("SELECT id FROM jobs")}
        for path in self.jobs_dir.iterdir():
            if path.name not in known:
                shutil.rmtree(path, ignore_errors=True)

    # Rows ------------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Optional[Row]:
        if not ID_PATTERN.match(job_id):
            return None
        with self._lock:
            cur = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            found = cur.fetchone()
        return _row(found) if found else None

    def unfinished(self) -> Iterator[Row]:
        """Jobs to run again after a restart, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state NOT IN ({','.join('?' * len(FINAL))}) ORDER BY seq",
                FINAL,
            ).fetchall()
        return (_row(r) for r in rows)

    def update(self, job_id: str, **values) -> None:
        values["updated"] = time.time()
        for key in ("progress", "history"):
            if key in values:
                values[key] = json.dumps(values[key])
        assignments = ", ".join(f"{k} = ?" for k in values)  # keys are ours, never a client's
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id))

    def count(self) -> dict:
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())


_COLUMNS = "id, seq, state, created, updated, options, inputs, styles, error, progress, history, seconds, resumed"


def _row(values) -> Row:
    (job_id, seq, state, created, updated, options, inputs, styles, error, progress, history, seconds, resumed) = values
    return Row(
        job_id,
        seq,
        state,
        created,
        updated,
        json.loads(options),
        json.loads(inputs),
        styles,
        error,
        json.loads(progress) if progress else None,
        json.loads(history) if history else [],
        seconds,
        resumed,
    )

"""What the service keeps on disk, under its state directory, so that a restart loses nothing.

::

    STATE/.nst-serve            the marker: this folder is an nst serve state dir, and its format version
    STATE/jobs.sqlite3          the job table (stdlib sqlite3, WAL journal)
    STATE/jobs/ID/content.npy   the content image as the job uses it: decoded, shrunk to the output size
    STATE/jobs/ID/style-N.npy   each style image, decoded and shrunk to its size at the last scale
    STATE/jobs/ID/checkpoint.pt the running job's state, every few steps and when the service stops
    STATE/jobs/ID/result.png    8-bit and 16-bit results, written once the job is done
    STATE/jobs/ID/result16.png
    STATE/incoming/ID/          a request's files while it is checked; renamed into jobs/ once its row is in

The state dir is the server's alone: it starts only in an empty folder (and marks it) or in one with its
marker, and it deletes only what it wrote itself (a job's own files, when the engine refuses the job right
after it was accepted; a checked request's staging folder). A job folder without a row, or a table that is
missing or empty beside job folders, is reported, never cleaned up.

Every path is built here from a job id the service made itself (checked against ``ID_PATTERN``); nothing a
client sends ever becomes part of a path.

Writes that fail (a full disk, a locked database) raise ``StoreFull`` from ``accept``; progress and outcomes
that cannot be written are kept in memory (``pending``), answered from there, and written by the next write
that succeeds, so that a full disk delays the table but never loses a job's end.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from engine.errors import UserError

# 128 random bits: ids cannot be guessed, so a result is only reachable by whoever created the job.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{22}$")
# The states a job can be in on disk. "queued" and "running" are resumed on restart; the rest are final.
FINAL = ("done", "failed", "cancelled")
MARKER = ".nst-serve"
FORMAT = 1  # of the state dir: the files above, and the table below
# What the server writes into a staging folder (content.npy, style-0.npy, ...): nothing else is removed.
STAGED = re.compile(r"^(content|style-\d+)\.npy(\.tmp)?$")

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


class StoreFull(UserError):
    """The state dir's disk is full: a request cannot be kept (507)."""


class StoreBusy(UserError):
    """The job table is locked (by another process on the state dir) for longer than the busy timeout (503)."""


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
    damaged: Optional[str] = None  # why the row cannot be run (a column that is not what we wrote)


def disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, UserError):  # the engine's sentence for a file it could not write names the cause
        return os.strerror(errno.ENOSPC) in str(exc)
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


class Store:
    """The job table and the job folders. Thread-safe: one connection behind a lock."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.incoming = self.root / "incoming"
        self._claim()
        self._lock = threading.Lock()
        self.pending: dict[str, dict] = {}  # job id -> column values not written yet (a full disk)
        self._db = self._open()
        self.jobs_dir.mkdir(exist_ok=True)  # only now: a refused start leaves the folder as it was
        self.incoming.mkdir(exist_ok=True)
        self.left_alone = self._tidy()

    # Opening -------------------------------------------------------------------------------------------

    def _claim(self) -> None:
        """Use ``root`` only if it is empty (then mark it) or already marked as ours, in a format we read."""
        marker = self.root / MARKER
        self.root.mkdir(parents=True, exist_ok=True)
        if marker.is_file():
            try:
                found = json.loads(marker.read_text(encoding="utf-8")).get("format")
            except (OSError, ValueError, AttributeError):
                found = None
            if found != FORMAT:
                raise UserError(
                    f"--state-dir {str(self.root)!r} is marked as an nst serve state dir of format {found!r}, "
                    f"but this version reads format {FORMAT} only; use another folder"
                )
        else:
            others = sorted(p.name for p in self.root.iterdir())
            if others:
                shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                raise UserError(
                    f"--state-dir {str(self.root)!r} holds other files ({shown}) and no {MARKER} marker; nst serve "
                    "uses only an empty folder or one it made itself, and never deletes what it did not write: "
                    "give a new or empty folder"
                )
            marker.write_text(json.dumps({"format": FORMAT, "written_by": "nst serve"}) + "\n", encoding="utf-8")

    def _open(self) -> sqlite3.Connection:
        path = self.root / "jobs.sqlite3"
        folders = [p for p in self.jobs_dir.iterdir() if p.is_dir()] if self.jobs_dir.is_dir() else []
        if folders and (not path.exists() or path.stat().st_size == 0):
            raise UserError(
                f"the job table {str(path)!r} is {'missing' if not path.exists() else 'empty'} but "
                f"{str(self.jobs_dir)!r} holds {len(folders)} job folder{'s' if len(folders) != 1 else ''}; "
                "restore the table from a backup, or move the folders away to start afresh (nothing was deleted)"
            )
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(SCHEMA)
            columns = [r[1] for r in db.execute("PRAGMA table_info(jobs)")]
            if columns != _COLUMNS.split(", "):
                raise sqlite3.DatabaseError(f"its jobs table has the columns {', '.join(columns)}")
            db.execute("SELECT COUNT(*) FROM jobs").fetchone()
            db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.Error as exc:
            raise UserError(
                f"the job table {str(path)!r} cannot be read ({exc}); restore it from a backup, or start with "
                "another --state-dir (nothing was deleted)"
            ) from None
        return db

    def _tidy(self) -> list[str]:
        """Remove the staging folders of requests that never finished (their files are ours by name); say
        what is left alone: other files in incoming/, and job folders without a row."""
        left = []
        for path in self.incoming.iterdir():
            if path.is_dir() and ID_PATTERN.match(path.name) and all(STAGED.match(f.name) for f in path.iterdir()):
                for f in path.iterdir():
                    f.unlink()
                path.rmdir()
            else:
                left.append(f"incoming/{path.name}")
        known = {r[0] for r in self._db.execute("SELECT id FROM jobs")}
        left += [f"jobs/{p.name}" for p in self.jobs_dir.iterdir() if p.name not in known]
        return left

    def close(self) -> None:
        self.flush()
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
        try:
            path.mkdir()
        except OSError as exc:
            raise _full(exc) from None
        return path

    @staticmethod
    def save_image(folder: Path, name: str, image: torch.Tensor) -> None:
        """One of a job's images as the job uses it (float32, exact: a resumed job sees the same pixels)."""
        part = folder / f"{name}.npy.tmp"
        try:
            with open(part, "wb") as fh:
                np.save(fh, image.numpy(), allow_pickle=False)
            part.rename(folder / f"{name}.npy")
        except OSError as exc:
            raise _full(exc) from None

    @staticmethod
    def load_image(folder: Path, name: str) -> torch.Tensor:
        array = np.load(folder / f"{name}.npy", allow_pickle=False)
        if array.dtype != np.float32 or array.ndim != 3 or array.shape[0] != 3:
            raise ValueError(f"{name}.npy holds {array.dtype} {array.shape}, not a (3, H, W) float32 image")
        return torch.from_numpy(array)

    def accept(self, staging: Path, row: Row) -> None:
        """Publish a checked request: its row, then its folder (a row whose folder is missing fails that job
        on the next start; a folder is never left without a row)."""
        try:
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
        except sqlite3.OperationalError as exc:
            raise _full(exc) from None
        try:
            staging.rename(self.folder(row.id))
        except OSError as exc:
            self.forget(row.id)
            raise _full(exc) from None

    def forget(self, job_id: str) -> None:
        """Undo ``accept`` (the engine refused the job): no row, and the job's own files gone."""
        try:
            with self._lock:
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        except sqlite3.Error:
            pass  # a row left queued: the next start runs it or fails it, in one sentence
        self.pending.pop(job_id, None)
        self.discard(self.folder(job_id))

    @staticmethod
    def discard(folder: Path) -> None:
        """Remove a staging or job folder's own files (by name) and the folder if nothing else is in it."""
        if not folder.is_dir():
            return
        for f in folder.iterdir():
            if STAGED.match(f.name) or f.name in ("checkpoint.pt", "result.png", "result16.png"):
                f.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass

    # Rows ------------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Optional[Row]:
        if not ID_PATTERN.match(job_id):
            return None
        with self._lock:
            found = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            late = dict(self.pending.get(job_id, {}))
        if not found:
            return None
        return replace(_row(found), **late) if late else _row(found)

    def unfinished(self) -> Iterator[Row]:
        """Jobs to run again after a restart, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state NOT IN ({','.join('?' * len(FINAL))}) ORDER BY seq",
                FINAL,
            ).fetchall()
        return (_row(r) for r in rows)

    def update(self, job_id: str, **values) -> bool:
        """Write ``values`` to the job's row; whether the table has them (else they wait in ``pending``)."""
        with self._lock:
            merged = {**self.pending.pop(job_id, {}), **values}
            try:
                self._write(job_id, merged)
            except sqlite3.Error:
                self.pending[job_id] = merged  # a full disk or a locked table: answered from memory meanwhile
                return False
        self.flush()
        return True

    def flush(self) -> bool:
        """Write what earlier writes could not; whether nothing is pending any more."""
        with self._lock:
            for job_id in list(self.pending):
                try:
                    self._write(job_id, self.pending[job_id])
                except sqlite3.Error:
                    return False
                del self.pending[job_id]
        return True

    def _write(self, job_id: str, values: dict) -> None:
        stored = {"updated": time.time(), **values}
        for key in ("progress", "history"):
            if key in stored:
                stored[key] = json.dumps(stored[key])
        assignments = ", ".join(f"{k} = ?" for k in stored)  # keys are ours, never a client's
        self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*stored.values(), job_id))

    def count(self) -> dict:
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())


_COLUMNS = "id, seq, state, created, updated, options, inputs, styles, error, progress, history, seconds, resumed"


def _full(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return StoreBusy("the server's job table is locked by another process; try again later")
    if disk_full(exc):
        return StoreFull("the server's disk is full; try again later")
    return exc


def _row(values) -> Row:
    """A row as written; a column that is not what the server wrote makes the row ``damaged``, not an error."""
    (job_id, seq, state, created, updated, options, inputs, styles, error, progress, history, seconds, resumed) = values
    damaged = None

    def parsed(text, default, name, kind):
        nonlocal damaged
        if not text:
            return default
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, kind):
            damaged = damaged or f"its stored {name} are not what the server wrote"
            return default
        return value

    row = Row(
        job_id,
        seq,
        state,
        created,
        updated,
        parsed(options, {}, "options", dict),
        parsed(inputs, {"content": None, "styles": []}, "inputs", dict),
        styles if isinstance(styles, int) else 0,
        error,
        parsed(progress, None, "progress", dict),
        parsed(history, [], "history", list),
        seconds,
        resumed if isinstance(resumed, int) else 0,
    )
    row.damaged = damaged
    return row

"""The catalog database: SQLite in WAL mode, one row per track and one per failed file.

An embedded file needs no server, survives a kill (every track is its own committed
transaction; WAL keeps readers working while ``catalog add`` writes) and copies like any
file (``CATALOG``, plus ``CATALOG-wal`` while a writer is open).

Tables::

    info      key -> value (schema version, the current tagging setup)
    setups    one row per tagging setup: model weights_sha256, name, source, tag list
              (JSON) and its sha256, vocabulary version, hop, aggregation, embedding size
    tracks    source (UNIQUE: an absolute path or a URL), content_sha256, setup_id,
              duration_s, windows, probs (n_tags float32), embedding (d float32,
              L2-normalised), taggram (windows x n_tags float16), window_embeddings
              (windows x d float16: what `rtagger train head` learns on), meta (JSON),
              added_at
    failures  source (UNIQUE), content_sha256, setup_id, error type, reason, failed_at

Resume rules (:meth:`Catalog.plan`): a source stored with the same content hash and the
same setup is skipped; a different hash (the file changed) or setup (another model, hop or
aggregation) re-tags it in place (the row is replaced, never duplicated). A failure with
the same hash and setup is not retried unless asked (the same bytes fail the same way).

The track embedding is the weighted mean of the window embeddings (each window weighed by
its share of real audio, as the track's mean tags are), L2-normalised, so the inner
product of two rows is their cosine similarity.

Embeddings are stored as raw float32 bytes: :meth:`Catalog.embeddings` joins them into one
``(n, d)`` array with a single ``frombuffer``, which is what an index loads.

Thread safety: a :class:`Catalog` holds one connection and is used from one thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtagger.errors import RtaggerError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS setups (
    id INTEGER PRIMARY KEY,
    weights_sha256 TEXT NOT NULL,
    hop_s REAL NOT NULL,
    aggregation TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_source TEXT,
    trained INTEGER NOT NULL,
    tags TEXT NOT NULL,
    tags_sha256 TEXT NOT NULL,
    vocabulary TEXT NOT NULL,
    embedding_dim INTEGER NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (weights_sha256, hop_s, aggregation)
);
CREATE TABLE IF NOT EXISTS tracks (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL UNIQUE,
    content_sha256 TEXT NOT NULL,
    setup_id INTEGER NOT NULL REFERENCES setups(id),
    duration_s REAL NOT NULL,
    windows INTEGER NOT NULL,
    probs BLOB NOT NULL,
    embedding BLOB NOT NULL,
    taggram BLOB NOT NULL,
    window_embeddings BLOB NOT NULL,
    meta TEXT,
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tracks_by_setup ON tracks (setup_id);
CREATE INDEX IF NOT EXISTS tracks_by_content ON tracks (content_sha256);
CREATE TABLE IF NOT EXISTS failures (
    source TEXT PRIMARY KEY,
    content_sha256 TEXT,
    setup_id INTEGER,
    error TEXT NOT NULL,
    reason TEXT NOT NULL,
    failed_at REAL NOT NULL
);
"""


class CatalogError(RtaggerError):
    """A catalog file is missing, not a catalog, newer than this code, or inconsistent."""


@dataclass(frozen=True)
class Setup:
    """What produced a catalog's tags: model weights, tag list, hop and aggregation."""

    weights_sha256: str
    hop_s: float
    aggregation: str
    model_name: str
    model_source: str | None
    trained: bool
    tags: tuple[str, ...]
    tags_sha256: str
    vocabulary: str
    embedding_dim: int
    id: int | None = None


@dataclass(frozen=True)
class TrackRecord:
    """One tagged track as stored (probs ``(n_tags,)``, embedding ``(d,)``, taggram
    ``(windows, n_tags)``, window_embeddings ``(windows, d)``; the window arrays are empty
    unless asked for)."""

    source: str
    content_sha256: str
    setup_id: int
    duration_s: float
    probs: np.ndarray
    embedding: np.ndarray
    taggram: np.ndarray
    window_embeddings: np.ndarray
    meta: dict | None = None
    id: int | None = None
    added_at: float | None = None


class Catalog:
    """One catalog file. ``create`` False refuses a path that holds no catalog yet;
    ``read_only`` opens an existing one through SQLite's ``mode=ro`` (queries only; WAL
    lets it read while ``catalog add`` writes)."""

    def __init__(self, path: str | Path, *, create: bool = True,
                 read_only: bool = False) -> None:
        self.path = Path(path)
        if (read_only or not create) and not self.path.is_file():
            raise CatalogError(f"{self.path}: no such catalog (create one with "
                               f"`rtagger catalog add PATH... --db {self.path}`)")
        if read_only:
            try:
                self.db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro",
                                          uri=True, timeout=30.0)
                self._check_version(read_only=True)
            except sqlite3.DatabaseError as e:
                raise CatalogError(f"{self.path}: not a usable catalog ({e})") from e
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=30.0)
            # WAL: commits are appends, readers never block the writer; NORMAL sync is
            # durable against a killed process (only a power cut may lose the last commits).
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
            self._check_version()
        except sqlite3.DatabaseError as e:
            raise CatalogError(f"{self.path}: not a usable catalog ({e})") from e

    def _check_version(self, read_only: bool = False) -> None:
        row = self.db.execute("SELECT value FROM info WHERE key='schema_version'").fetchone()
        if row is None and read_only:
            raise CatalogError(f"{self.path}: not a catalog (no schema version)")
        if row is None:
            with self.db:
                self.db.execute("INSERT INTO info VALUES ('schema_version', ?)",
                                (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise CatalogError(f"{self.path}: catalog schema {row[0]} is newer than this "
                               f"rtagger supports ({SCHEMA_VERSION}); upgrade")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- setups ----------------------------------------------------------------------------

    def register_setup(self, setup: Setup) -> Setup:
        """The stored row of ``setup`` (inserted if new); it becomes the current setup."""
        key = (setup.weights_sha256, setup.hop_s, setup.aggregation)
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO setups (weights_sha256, hop_s, aggregation, model_name,"
                " model_source, trained, tags, tags_sha256, vocabulary, embedding_dim,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (*key, setup.model_name, setup.model_source, int(setup.trained),
                 json.dumps(list(setup.tags)), setup.tags_sha256, setup.vocabulary,
                 setup.embedding_dim, time.time()))
            (sid,) = self.db.execute("SELECT id FROM setups WHERE weights_sha256=? AND "
                                     "hop_s=? AND aggregation=?", key).fetchone()
            self.db.execute("INSERT OR REPLACE INTO info VALUES ('current_setup', ?)",
                            (str(sid),))
        return self.setup(sid)

    def setup(self, setup_id: int | None = None) -> Setup:
        """Setup ``setup_id``, or the current one (the last ``add``'s)."""
        if setup_id is None:
            row = self.db.execute("SELECT value FROM info WHERE key='current_setup'").fetchone()
            if row is None:
                raise CatalogError(f"{self.path}: the catalog is empty (nothing added yet)")
            setup_id = int(row[0])
        row = self.db.execute(
            "SELECT weights_sha256, hop_s, aggregation, model_name, model_source, trained, "
            "tags, tags_sha256, vocabulary, embedding_dim, id FROM setups WHERE id=?",
            (setup_id,)).fetchone()
        if row is None:
            raise CatalogError(f"{self.path}: no setup {setup_id}")
        return Setup(row[0], row[1], row[2], row[3], row[4], bool(row[5]),
                     tuple(json.loads(row[6])), row[7], row[8], row[9], row[10])

    def setups(self) -> list[tuple[Setup, int]]:
        """Every setup with its number of tracks."""
        rows = self.db.execute("SELECT s.id, COUNT(t.id) FROM setups s LEFT JOIN tracks t "
                               "ON t.setup_id = s.id GROUP BY s.id ORDER BY s.id").fetchall()
        return [(self.setup(sid), n) for sid, n in rows]

    # --- resume ----------------------------------------------------------------------------

    def stored(self) -> dict[str, tuple[str, int]]:
        """source -> (content_sha256, setup_id) of every stored track."""
        return {s: (h, i) for s, h, i in
                self.db.execute("SELECT source, content_sha256, setup_id FROM tracks")}

    def failed(self) -> dict[str, tuple[str | None, int | None]]:
        """source -> (content_sha256, setup_id) of every recorded failure."""
        return {s: (h, i) for s, h, i in
                self.db.execute("SELECT source, content_sha256, setup_id FROM failures")}

    # --- writing ---------------------------------------------------------------------------

    def put(self, rec: TrackRecord) -> int:
        """Store (or replace) one track and clear its failure, in one transaction."""
        probs = np.ascontiguousarray(rec.probs, np.float32)
        emb = np.ascontiguousarray(rec.embedding, np.float32)
        gram = np.ascontiguousarray(rec.taggram, np.float16)
        wemb = np.ascontiguousarray(rec.window_embeddings, np.float16)
        if gram.ndim != 2 or gram.shape[1] != probs.shape[0]:
            raise CatalogError(f"{rec.source}: taggram {gram.shape} does not match "
                               f"{probs.shape[0]} tags")
        if wemb.shape != (gram.shape[0], emb.shape[0]):
            raise CatalogError(f"{rec.source}: window embeddings {wemb.shape} do not match "
                               f"{gram.shape[0]} windows of {emb.shape[0]} dimensions")
        with self.db:
            cur = self.db.execute(
                "INSERT INTO tracks (source, content_sha256, setup_id, duration_s, windows, "
                "probs, embedding, taggram, window_embeddings, meta, added_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(source) DO UPDATE SET content_sha256=excluded.content_sha256, "
                "setup_id=excluded.setup_id, duration_s=excluded.duration_s, "
                "windows=excluded.windows, probs=excluded.probs, "
                "embedding=excluded.embedding, taggram=excluded.taggram, "
                "window_embeddings=excluded.window_embeddings, "
                "meta=excluded.meta, added_at=excluded.added_at RETURNING id",
                (rec.source, rec.content_sha256, rec.setup_id, float(rec.duration_s),
                 gram.shape[0], probs.tobytes(), emb.tobytes(), gram.tobytes(), wemb.tobytes(),
                 json.dumps(rec.meta) if rec.meta else None, time.time()))
            (track_id,) = cur.fetchone()
            self.db.execute("DELETE FROM failures WHERE source=?", (rec.source,))
        return track_id

    def put_failure(self, source: str, content_sha256: str | None, setup_id: int,
                    error: str, reason: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO failures VALUES (?,?,?,?,?,?)",
                            (source, content_sha256, setup_id, error, reason, time.time()))

    # --- reading ---------------------------------------------------------------------------

    def count(self, setup_id: int | None = None) -> int:
        if setup_id is None:
            return self.db.execute("SELECT COUNT(*) FROM tracks").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM tracks WHERE setup_id=?",
                               (setup_id,)).fetchone()[0]

    def failures(self) -> list[dict]:
        rows = self.db.execute("SELECT source, error, reason, failed_at FROM failures "
                               "ORDER BY source").fetchall()
        return [{"source": s, "error": e, "reason": r, "failed_at": t} for s, e, r, t in rows]

    def matrix(self, column: str, setup_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Track ids ``(n,)`` int64 and the ``(n, width)`` float32 rows of ``probs`` or
        ``embedding`` for the tracks of one setup, in id order."""
        if column not in ("probs", "embedding"):
            raise ValueError(column)
        setup = self.setup(setup_id)
        width = len(setup.tags) if column == "probs" else setup.embedding_dim
        rows = self.db.execute(f"SELECT id, {column} FROM tracks WHERE setup_id=? "
                               f"ORDER BY id", (setup_id,)).fetchall()
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        data = np.frombuffer(b"".join(r[1] for r in rows), np.float32)
        return ids, data.reshape(len(rows), width)

    def embeddings(self, setup_id: int) -> tuple[np.ndarray, np.ndarray]:
        return self.matrix("embedding", setup_id)

    def tracks(self, ids: list[int] | None = None, setup_id: int | None = None,
               taggram: bool = False, window_embeddings: bool = False) -> list[TrackRecord]:
        """Stored tracks by id (in the order given), or all of one setup in id order;
        ``taggram`` / ``window_embeddings`` also read those (larger) arrays."""
        cols = ("id, source, content_sha256, setup_id, duration_s, probs, embedding, windows, "
                + ("taggram" if taggram else "NULL") + ", "
                + ("window_embeddings" if window_embeddings else "NULL") + ", meta, added_at")
        if ids is not None:
            rows = []
            for i in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                part = [int(x) for x in ids[i : i + 500]]
                rows += self.db.execute(f"SELECT {cols} FROM tracks WHERE id IN "
                                        f"({','.join('?' * len(part))})", part).fetchall()
            by_id = {r[0]: r for r in rows}
            rows = [by_id[int(i)] for i in ids if int(i) in by_id]
        else:
            where, args = ("WHERE setup_id=?", (setup_id,)) if setup_id is not None else ("", ())
            rows = self.db.execute(f"SELECT {cols} FROM tracks {where} ORDER BY id",
                                   args).fetchall()
        setups: dict[int, Setup] = {}
        out = []
        for r in rows:
            s = setups.setdefault(r[3], self.setup(r[3]))
            n = r[7]
            gram = (np.frombuffer(r[8], np.float16).reshape(n, len(s.tags)) if taggram
                    else np.zeros((n, 0), np.float16))
            wemb = (np.frombuffer(r[9], np.float16).reshape(n, s.embedding_dim)
                    if window_embeddings else np.zeros((n, 0), np.float16))
            out.append(TrackRecord(r[1], r[2], r[3], r[4], np.frombuffer(r[5], np.float32),
                                   np.frombuffer(r[6], np.float32), gram, wemb,
                                   json.loads(r[10]) if r[10] else None, r[0], r[11]))
        return out

    def track_by_source(self, source: str) -> TrackRecord | None:
        row = self.db.execute("SELECT id FROM tracks WHERE source=?", (source,)).fetchone()
        return self.tracks([row[0]])[0] if row else None

"""Read-only catalog endpoints on the server's port (``rtagger serve --catalog CATALOG``).

``GET`` requests, JSON answers (docs/catalog.md, "Serving a catalog"):

- ``/api/catalog``: tracks, failures (a count), every tagging setup and whether it is the
  served model's;
- ``/api/catalog/search?tag=rock&tag=drums&min=0.5&limit=50``: :func:`search_tags`;
- ``/api/catalog/similar?id=TRACK_ID&k=10``: the nearest tracks of a catalogued track;
- ``/api/catalog/track?id=TRACK_ID[&neighbours=5][&taggram=false]``: one track's tags,
  metadata and taggram.

``GET /catalog`` (:data:`PAGE`) is the page that browses them: search by tags, a track's
taggram and its similar tracks (``rtagger/data/catalog.html``; it uses these endpoints only,
the vocabulary included, which ``/api/catalog`` lists per setup).

Every parameter is checked (unknown or repeated parameters, ranges, tags of the setup) and
every answer is bounded (:data:`MAX_LIMIT`, :data:`MAX_K`, :data:`MAX_TAGGRAM_ROWS`). A
request names tracks by their catalog id only: an id is looked up as an integer in the
``tracks`` table and nothing else, so ``../../etc/passwd`` is just an id that no track has
(404). No endpoint tags audio or opens a file a client names; similarity is by the stored
embeddings, so a catalog made with another model than the served one is served too, with
its setup reported. Answers carry a track's file *name* (the basename of its source),
never the source path or URL: those describe the operator's file system. Manifest
metadata is passed on, except values that are absolute paths or URLs.

The server's access rules (Host, token, Origin) run before a request gets here
(``server.py``, ``TagServer._refusal``); this module only answers.

Thread safety: one thread, this module's single-worker executor, owns the read-only
:class:`~rtagger.catalog.store.Catalog` connection and the in-memory similarity indexes;
:meth:`CatalogAPI.answer` runs only there. The event loop only submits requests
(:meth:`CatalogAPI.respond`) and counts them: at most ``max_pending`` run or wait, and the
next one gets 503 at once, so a slow query never blocks streams and requests cannot pile up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urlsplit

import numpy as np

from rtagger.audio.decode import WINDOW_S, is_url
from rtagger.catalog.index import EmbeddingIndex
from rtagger.catalog.query import search_tags, track_summary
from rtagger.catalog.store import Catalog, CatalogError, Setup, TrackRecord

log = logging.getLogger(__name__)

PREFIX = "/api/catalog"
PAGE = "/catalog"  # the catalog view, served with the dashboard (server.py)
MAX_LIMIT = 1000  # search results per answer
MAX_K = 100  # neighbours per answer
MAX_TAGS = 16  # tags per search
MAX_TAGGRAM_ROWS = 1000  # a longer taggram is averaged over runs of windows
MAX_PENDING = 8  # requests running or waiting for the catalog thread; then 503
MAX_ID_CHARS = 64
MAX_FIELDS = 64  # query parameters in one request
TOP_TAGS = 5  # tags in each result's summary
_TRACK_ID = re.compile(r"[0-9]{1,18}")
_INT = re.compile(r"[0-9]{1,7}")
_FLOAT = re.compile(r"[0-9]*\.?[0-9]+")
_ABSOLUTE = re.compile(r"(/|~|[A-Za-z]:[\\/]|\\\\|[A-Za-z][A-Za-z0-9+.-]*://)")
_BOOLS = {"true": True, "1": True, "false": False, "0": False}

# endpoint -> the parameters it takes (besides ``token``, which the server checks)
_PARAMS = {
    "": (),
    "search": ("tag", "min", "limit", "setup"),
    "similar": ("id", "k"),
    "track": ("id", "neighbours", "taggram"),
}


def is_catalog_path(path: str) -> bool:
    """``path`` (without query) is one of this module's endpoints' or below them."""
    return path == PREFIX or path.startswith(PREFIX + "/")


class ApiError(Exception):
    """A request answered with an error status: ``{"type": "error", "code", "message"}``
    plus ``extra`` fields (the known tags of an unknown tag, the allowed parameters...)."""

    def __init__(self, status: HTTPStatus, code: str, message: str, **extra: object) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        super().__init__(message)

    def doc(self) -> dict:
        return {"type": "error", "code": self.code, "message": self.message, **self.extra}


def _bad(message: str, **extra: object) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, "bad_request", message, **extra)


class CatalogAPI:
    """The catalog at ``path``, opened read-only, answering the endpoints above.

    ``served_weights_sha256``: the served model's weights, so answers can say whether a
    setup is the served model's. Raises :class:`CatalogError` when ``path`` is missing or
    not a catalog.
    """

    def __init__(self, path: str | Path, *, served_weights_sha256: str | None = None,
                 max_pending: int = MAX_PENDING) -> None:
        self.path = Path(path)
        self.served_weights_sha256 = served_weights_sha256
        self.max_pending = max_pending
        self._slots = threading.BoundedSemaphore(max_pending)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rtagger-catalog")
        # Owned by the executor's thread (see "Thread safety").
        self._catalog: Catalog | None = None
        self._indexes: dict[int, EmbeddingIndex] = {}
        self._data_version: int | None = None
        try:
            self.info_at_start = self._executor.submit(self._open).result()
        except Exception:
            self.close()
            raise
        current = self.info_at_start["current_setup"]
        for s in self.info_at_start["setups"]:
            if s["id"] == current and not s["served_model"]:
                log.warning("catalog %s: its tags come from model %s (weights %s...), not the "
                            "served model; search, track and similar by id answer from the "
                            "catalog's own tags and embeddings", self.path.name, s["model"],
                            s["weights_sha256"][:12])

    def _open(self) -> dict:
        self._catalog = Catalog(self.path, read_only=True)
        return self.info()

    def close(self) -> None:
        """Close the connection (in its thread) and stop the thread; waits for both."""
        try:
            self._executor.submit(self._close).result()
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def _close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    # --- event loop side ------------------------------------------------------------------

    async def respond(self, path: str, query: str) -> tuple[HTTPStatus, bytes]:
        """The status and JSON body of ``GET path?query``, computed in the catalog thread;
        503 at once while ``max_pending`` requests are running or waiting."""
        if not self._slots.acquire(blocking=False):
            return _encode(HTTPStatus.SERVICE_UNAVAILABLE, ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE, "busy", f"the catalog is answering "
                f"{self.max_pending} requests; try again shortly").doc())
        try:
            future = self._executor.submit(self.encoded, path, query)
        except RuntimeError:  # shut down: the server is stopping
            self._slots.release()
            return _encode(HTTPStatus.SERVICE_UNAVAILABLE, ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE, "busy", "the server is stopping").doc())
        # Released when the query really ends (or is cancelled before it starts), not when
        # the waiting request goes away, so the bound holds for the thread's queue.
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)

    # --- catalog thread -------------------------------------------------------------------

    def encoded(self, path: str, query: str) -> tuple[HTTPStatus, bytes]:
        """:meth:`answer` as JSON bytes (encoded here, not on the event loop)."""
        status, doc = self.answer(path, query)
        try:
            return _encode(status, doc)
        except ValueError:  # a NaN or inf in a stored array
            log.exception("catalog request %s: answer is not JSON", path)
            return _encode(HTTPStatus.INTERNAL_SERVER_ERROR, ApiError(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal", "internal error on this "
                "request").doc())

    def answer(self, path: str, query: str) -> tuple[HTTPStatus, dict]:
        """``GET path?query`` -> (status, JSON document). Runs in the catalog thread."""
        try:
            endpoint = path[len(PREFIX):].strip("/") if is_catalog_path(path) else None
            if endpoint not in _PARAMS:
                raise ApiError(HTTPStatus.NOT_FOUND, "not_found", f"no such endpoint; the "
                               f"catalog answers {', '.join(_endpoints())}")
            params = _params(query, _PARAMS[endpoint])
            if endpoint == "":
                return HTTPStatus.OK, self.info()
            handler = {"search": self._search, "similar": self._similar,
                       "track": self._track}[endpoint]
            return HTTPStatus.OK, handler(params)
        except ApiError as e:
            return e.status, e.doc()
        except Exception:
            # One failing query is logged and answered; the thread and the server go on.
            log.exception("catalog request %s failed", path)
            return HTTPStatus.INTERNAL_SERVER_ERROR, ApiError(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal", "internal error on this "
                "request").doc()

    @property
    def catalog(self) -> Catalog:
        assert self._catalog is not None, "the catalog is closed"
        return self._catalog

    def info(self) -> dict:
        cat = self.catalog
        current = self._current_setup_id()
        return {"catalog": self.path.name, "tracks": cat.count(),
                "failures": len(cat.failures()), "current_setup": current,
                "setups": [self._setup_doc(s) | {"tracks": n, "tags": list(s.tags),
                                                 "embedding_dim": s.embedding_dim,
                                                 "current": s.id == current}
                           for s, n in cat.setups()],
                "served_model": {"weights_sha256": self.served_weights_sha256},
                "limits": {"limit": MAX_LIMIT, "k": MAX_K, "tags": MAX_TAGS,
                           "taggram_rows": MAX_TAGGRAM_ROWS}}

    def _search(self, params: dict[str, str | list[str]]) -> dict:
        setup = self._setup(params.get("setup"))
        tags = list(dict.fromkeys(params.get("tag", [])))  # repeated tags count once
        if not tags:
            raise _bad("give at least one tag (?tag=rock&tag=drums)",
                       known_tags=list(setup.tags))
        if len(tags) > MAX_TAGS:
            raise _bad(f"at most {MAX_TAGS} tags per search")
        unknown = [t for t in tags if t not in setup.tags]
        if unknown:
            raise _bad(f"unknown tag(s) {', '.join(unknown)[:200]}; this setup's model "
                       f"({setup.model_name}) has the known_tags", unknown=unknown[:MAX_TAGS],
                       known_tags=list(setup.tags))
        min_p = _number(params, "min", 0.5, 0.0, 1.0)
        limit = _integer(params, "limit", 50, 1, MAX_LIMIT)
        res = search_tags(self.catalog, tags, min_p=min_p, limit=limit, setup_id=setup.id)
        res["setup"] = self._setup_doc(setup)
        res["results"] = [_public(r) for r in res["results"]]
        return res

    def _similar(self, params: dict[str, str | list[str]]) -> dict:
        rec = self._track_record(params)
        k = _integer(params, "k", 10, 1, MAX_K)
        setup = self.catalog.setup(rec.setup_id)
        return self._neighbours(rec, setup, k) | {"query": _public(track_summary(rec, setup,
                                                                                 TOP_TAGS))}

    def _track(self, params: dict[str, str | list[str]]) -> dict:
        rec = self._track_record(params, taggram=True)
        n = _integer(params, "neighbours", 0, 0, MAX_K)
        with_taggram = _flag(params, "taggram", True)
        setup = self.catalog.setup(rec.setup_id)
        track = _public(track_summary(rec, setup, top=10)) | {
            "windows": int(rec.taggram.shape[0]), "content_sha256": rec.content_sha256,
            "added_at": rec.added_at, "tags": list(setup.tags),
            "probs": [round(float(p), 4) for p in rec.probs]}
        doc = {"track": track, "setup": self._setup_doc(setup)}
        if with_taggram:
            doc["taggram"] = _taggram(rec.taggram, setup.hop_s)
        if n:
            doc["neighbours"] = self._neighbours(rec, setup, n)["results"]
        return doc

    # --- helpers (catalog thread) ---------------------------------------------------------

    def _track_record(self, params: dict[str, str | list[str]], *,
                      taggram: bool = False) -> TrackRecord:
        """The track ``params["id"]`` names. The id is text and is only ever compared with
        the ``tracks`` table's integer ids: anything else is a track that does not exist."""
        raw = params.get("id")
        if raw is None or raw == "":
            raise _bad("give a track id (?id=TRACK_ID; ids are in search results)")
        if len(raw) > MAX_ID_CHARS:
            raise _bad(f"a track id has at most {MAX_ID_CHARS} characters")
        found = (self.catalog.tracks([int(raw)], taggram=taggram)
                 if _TRACK_ID.fullmatch(raw) else [])
        if not found:
            raise ApiError(HTTPStatus.NOT_FOUND, "not_found", "no track with this id in the "
                           "catalog (ids are the integers in search results)")
        return found[0]

    def _neighbours(self, rec: TrackRecord, setup: Setup, k: int) -> dict:
        """The ``k`` tracks of ``rec``'s own setup nearest to it (never itself)."""
        index = self._index(setup)
        ids, scores = index.search(rec.embedding[None, :], k, np.array([rec.id]))
        keep = ids[0] >= 0
        recs = self.catalog.tracks(ids[0][keep].tolist())
        return {"index": index.kind, "tracks_searched": len(index),
                "setup": self._setup_doc(setup),
                "results": [_public(track_summary(r, setup, TOP_TAGS, score=s))
                            for r, s in zip(recs, scores[0][keep], strict=True)]}

    def _index(self, setup: Setup) -> EmbeddingIndex:
        """The setup's embedding index, kept in memory until the catalog changes (SQLite's
        ``data_version`` moves when another connection, e.g. ``catalog add``, commits)."""
        version = self.catalog.db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._indexes.clear()
            self._data_version = version
        index = self._indexes.get(setup.id)
        if index is None:
            # In memory only: a server with a read-only catalog writes nothing beside it.
            index = EmbeddingIndex(*self.catalog.embeddings(setup.id), "auto")
            self._indexes[setup.id] = index
        return index

    def _current_setup_id(self) -> int | None:
        try:
            return self.catalog.setup().id
        except CatalogError:  # nothing added yet
            return None

    def _setup(self, raw: str | None) -> Setup:
        if raw is None:
            if self._current_setup_id() is None:
                raise ApiError(HTTPStatus.NOT_FOUND, "not_found", "the catalog is empty")
            return self.catalog.setup()
        known = [s.id for s, _ in self.catalog.setups()]
        if not _INT.fullmatch(raw) or int(raw) not in known:
            raise _bad("setup must be one of the catalog's setup ids", known_setups=known)
        return self.catalog.setup(int(raw))

    def _setup_doc(self, setup: Setup) -> dict:
        return {"id": setup.id, "model": setup.model_name,
                "model_source": _basename(setup.model_source or ""),
                "weights_sha256": setup.weights_sha256, "trained": setup.trained,
                "vocabulary": setup.vocabulary, "hop_s": setup.hop_s,
                "aggregation": setup.aggregation,
                "served_model": setup.weights_sha256 == self.served_weights_sha256}


def _endpoints() -> list[str]:
    return [PREFIX + (f"/{e}" if e else "") for e in _PARAMS]


def _params(query: str, allowed: tuple[str, ...]) -> dict[str, str | list[str]]:
    """The query string -> one value per parameter (a list for ``tag``)."""
    try:
        parsed = parse_qs(query, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError as e:
        raise _bad(f"bad query string ({e})") from None
    parsed.pop("token", None)
    unknown = sorted(set(parsed) - set(allowed))
    if unknown:
        raise _bad(f"unknown parameter(s) {', '.join(unknown)[:200]}",
                   allowed=list(allowed))
    out: dict[str, str | list[str]] = {}
    for key, values in parsed.items():
        if key == "tag":
            out[key] = values
        elif len(values) > 1:
            raise _bad(f"{key} given {len(values)} times")
        else:
            out[key] = values[0]
    return out


def _integer(params: dict, key: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(key)
    if raw is None:
        return default
    if not _INT.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise _bad(f"{key} must be an integer from {lo} to {hi}")
    return int(raw)


def _number(params: dict, key: str, default: float, lo: float, hi: float) -> float:
    raw = params.get(key)
    if raw is None:
        return default
    value = float(raw) if len(raw) <= 20 and _FLOAT.fullmatch(raw) else math.nan
    if not lo <= value <= hi:  # NaN fails too
        raise _bad(f"{key} must be a number from {lo:g} to {hi:g}")
    return value


def _flag(params: dict, key: str, default: bool) -> bool:
    raw = params.get(key)
    if raw is None:
        return default
    if raw.lower() not in _BOOLS:
        raise _bad(f"{key} must be true or false")
    return _BOOLS[raw.lower()]


def _basename(source: str) -> str:
    """A source's file name: never its folders (the operator's file system) nor, for a
    URL, its host, query or credentials."""
    path = urlsplit(source).path if is_url(source) else source.replace("\\", "/")
    return PurePosixPath(path).name


def _public(summary: dict) -> dict:
    """A :func:`track_summary` fit to serve: ``name`` (a basename) instead of ``source``,
    and metadata without values that are absolute paths or URLs."""
    out = {k: v for k, v in summary.items() if k not in ("source", "meta")}
    out["name"] = _basename(summary.get("source", ""))
    meta = summary.get("meta")
    if meta:
        out["meta"] = {k: v for k, v in meta.items()
                       if not (isinstance(v, str) and _ABSOLUTE.match(v))}
    return out


def _taggram(gram: np.ndarray, hop_s: float) -> dict:
    """``(windows, n_tags)`` float16 -> rows of probabilities (3 decimals), windows in
    order; past :data:`MAX_TAGGRAM_ROWS` windows each row is the mean of a run of
    ``windows_per_row`` consecutive windows (the last run may be shorter)."""
    n = gram.shape[0]
    per_row = max(1, math.ceil(n / MAX_TAGGRAM_ROWS))
    data = gram.astype(np.float32)
    if per_row > 1:
        starts = np.arange(0, n, per_row)
        data = np.add.reduceat(data, starts, axis=0) / np.diff(np.append(starts, n))[:, None]
    return {"hop_s": hop_s, "window_s": round(WINDOW_S, 4), "windows_per_row": per_row,
            "rows": np.round(data, 3).tolist()}


def _encode(status: HTTPStatus, doc: dict) -> tuple[HTTPStatus, bytes]:
    return status, json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()

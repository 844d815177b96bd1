"""``catalog export``: one setup's tracks as parquet, CSV, JSONL or one JSON document.

Columns: ``id``, ``source``, ``content_sha256``, ``duration_s``, ``windows``, one column per
tag (track probability, named by the tag), ``meta`` (JSON text in CSV and parquet), and
with ``embeddings`` the track embedding (parquet: a fixed-size float32 list; JSON: a list;
CSV: columns ``emb_0`` ...). Parquet needs pyarrow (``pip install 'rtagger[catalog]'``).
Files are written atomically; CSV, JSONL and JSON go to stdout without a path.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TextIO

import numpy as np

from rtagger.atomic import atomic_path, atomic_write
from rtagger.catalog.store import Catalog
from rtagger.errors import ConfigError, EngineUnavailable

FORMATS = ("parquet", "csv", "jsonl", "json")


def export_catalog(catalog: Catalog, fmt: str, out: Path | None, *, embeddings: bool = False,
                   setup_id: int | None = None, stdout: TextIO | None = None) -> int:
    """Write the tracks of one setup; returns how many were written."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet" and out is None:
        raise ConfigError("parquet needs --out FILE")
    setup = catalog.setup(setup_id)
    recs = catalog.tracks(setup_id=setup.id)
    tags = list(setup.tags)
    rows = []
    for r in recs:
        row = {"id": r.id, "source": r.source, "content_sha256": r.content_sha256,
               "duration_s": r.duration_s, "windows": len(r.taggram)}
        row.update({t: float(p) for t, p in zip(tags, r.probs, strict=True)})
        row["meta"] = r.meta
        if embeddings:
            row["embedding"] = r.embedding
        rows.append(row)
    if fmt == "parquet":
        _parquet(rows, tags, out, embeddings, setup.embedding_dim)
        return len(rows)
    buf = io.StringIO()
    if fmt == "csv":
        _csv(rows, tags, buf, embeddings, setup.embedding_dim)
    elif fmt == "jsonl":
        for row in rows:
            buf.write(json.dumps(_jsonable(row)) + "\n")
    else:
        json.dump({"setup": {"model": setup.model_name, "weights_sha256": setup.weights_sha256,
                             "vocabulary": setup.vocabulary, "tags": tags},
                   "tracks": [_jsonable(row) for row in rows]}, buf)
        buf.write("\n")
    if out is None:
        (stdout or io.StringIO()).write(buf.getvalue())
    else:
        atomic_write(out, buf.getvalue())
    return len(rows)


def _jsonable(row: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()}


def _csv(rows: list[dict], tags: list[str], buf: io.StringIO, embeddings: bool,
         dim: int) -> None:
    head = ["id", "source", "content_sha256", "duration_s", "windows", *tags, "meta"]
    if embeddings:
        head += [f"emb_{i}" for i in range(dim)]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for r in rows:
        line = [r["id"], r["source"], r["content_sha256"], f"{r['duration_s']:.3f}",
                r["windows"], *(f"{r[t]:.5f}" for t in tags),
                json.dumps(r["meta"]) if r["meta"] else ""]
        if embeddings:
            line += [f"{x:.6f}" for x in r["embedding"]]
        w.writerow(line)


def _parquet(rows: list[dict], tags: list[str], out: Path, embeddings: bool,
             dim: int) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise EngineUnavailable(f"parquet export needs pyarrow ({e}); pip install "
                                f"'rtagger[catalog]'") from e
    cols = {
        "id": pa.array([r["id"] for r in rows], pa.int64()),
        "source": pa.array([r["source"] for r in rows], pa.string()),
        "content_sha256": pa.array([r["content_sha256"] for r in rows], pa.string()),
        "duration_s": pa.array([r["duration_s"] for r in rows], pa.float64()),
        "windows": pa.array([r["windows"] for r in rows], pa.int32()),
    }
    for t in tags:
        cols[t] = pa.array([r[t] for r in rows], pa.float32())
    cols["meta"] = pa.array([json.dumps(r["meta"]) if r["meta"] else None for r in rows],
                            pa.string())
    if embeddings:
        flat = (np.concatenate([r["embedding"] for r in rows]) if rows
                else np.zeros(0, np.float32))
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(flat.astype(np.float32)), dim)
    table = pa.table(cols)
    with atomic_path(out) as tmp:
        pq.write_table(table, str(tmp))

"""The catalog: a whole library tagged into one embedded database, searched by tag and by sound.

Modules in data-path order:

- :mod:`.sources`: what ``rtagger catalog add`` is given (folders, files, URL lists,
  manifests) -> :class:`~rtagger.catalog.sources.Source` records;
- :mod:`.store`: the SQLite (WAL) catalog: schema, one row per track and per failure,
  resume rules;
- :mod:`.add`: decoding in worker processes, inference in one batched owner, rows written
  as tracks finish;
- :mod:`.index`: nearest tracks by embedding (exact numpy search, FAISS HNSW above a
  size threshold);
- :mod:`.export`: parquet / CSV / JSONL / JSON;
- :mod:`.bench`: index build and query timings, neighbour quality, catalog throughput.

The catalog imports the audio, model, engines and pipeline rooms, never live, bench or cli.
"""

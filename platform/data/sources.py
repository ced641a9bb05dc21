"""Reading sources into documents, one work unit ("chunk") at a time.

The input is cut into chunks of about ``plan.chunk_bytes`` of files (or Hugging Face
stream shards). Each chunk is read by one Ray Data task, streaming, and every later
stage keeps that chunk's identity, so output files and their contents do not depend on
how Ray schedules or splits blocks: a re-run gives the same shards.

Files of all sources are interleaved before chunking, so every chunk (and so every
output shard) holds a mix of sources.

Bad input never stops the job: a record that cannot be used becomes a ``Doc`` with
``text=None`` and a reason (``malformed_json``, ``invalid_utf8``, ``missing_text``,
``too_long``, ``unreadable_file``), which the report counts.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Iterator

from mamba_slm.platform.data.plan import CurationPlan, SourceSpec

# Raw records above this are skipped unread ("too_long"): generated dumps, not text.
MAX_DOC_BYTES = 8_000_000
# doc_id = source (6 bits) | file (30 bits) | record within the file (27 bits): unique,
# ordered by source priority, and the smallest id of a duplicate cluster is the one kept.
FILE_BITS, RECORD_BITS = 30, 27


def make_doc_id(source_idx: int, file_idx: int, record_idx: int) -> int:
    if record_idx >= 1 << RECORD_BITS or file_idx >= 1 << FILE_BITS:
        raise ValueError(f"file {file_idx} record {record_idx} overflows the doc id")
    return (source_idx << (FILE_BITS + RECORD_BITS)) | (file_idx << RECORD_BITS) | record_idx


def doc_source(doc_id: int) -> int:
    return doc_id >> (FILE_BITS + RECORD_BITS)


@dataclass
class Doc:
    doc_id: int
    source: int
    text: str | None
    reason: str | None = None   # set when text is None
    raw_bytes: int = 0


class MissingInputError(FileNotFoundError):
    """A source's paths match nothing (the job exits with code 2)."""


def discover_files(spec: SourceSpec) -> list[str]:
    files: set[str] = set()
    for pattern in spec.paths:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matches and not glob.has_magic(pattern) and os.path.exists(pattern):
            matches = [pattern]
        files.update(m for m in matches if not os.path.isdir(m))
    files = {f for f in files if not any(x in f for x in spec.exclude)}
    if not files:
        raise MissingInputError(
            f"source {spec.name!r}: no input files match {list(spec.paths)} "
            f"(check the path, or the glob's quoting in your shell)")
    ordered = sorted(files)
    return ordered[: spec.max_files] if spec.max_files else ordered


def _hf_args(spec: SourceSpec) -> tuple[str, str | None, list[str] | None]:
    name, _, config = spec.paths[0].partition(":")
    data_files = list(spec.paths[1:]) or None
    return name, config or None, data_files


def _hf_stream(spec: SourceSpec):
    import datasets

    name, config, data_files = _hf_args(spec)
    return datasets.load_dataset(name, config, data_files=data_files, split=spec.split, streaming=True)


def plan_chunks(plan: CurationPlan) -> list[dict]:
    """Cut every source into work units; raises MissingInputError for empty sources.
    A chunk is a JSON-able dict: {"chunk": i, "items": [[source_idx, file_idx, path]...],
    "bytes": input size} (for HF sources path is "hf:<shard>/<n_shards>", size a guess)."""
    per_source: list[list[tuple[int, int, str, int]]] = []
    for s_idx, spec in enumerate(plan.sources):
        if spec.format == "hf":
            n_shards = _hf_stream(spec).n_shards
            items = [(s_idx, i, f"hf:{i}/{n_shards}", plan.chunk_bytes) for i in range(n_shards)]
        else:
            items = []
            for f_idx, path in enumerate(discover_files(spec)):
                try:
                    size = os.path.getsize(path)
                except OSError:
                    size = 0
                items.append((s_idx, f_idx, path, size))
        per_source.append(items)
    # Round-robin interleave sources in proportion to their item counts.
    interleaved = sorted(
        (item for items in per_source for item in items),
        key=lambda it: ((it[1] + 0.5) / len(per_source[it[0]]), it[0]))
    chunks, current, size = [], [], 0
    for s_idx, f_idx, path, nbytes in interleaved:
        current.append([s_idx, f_idx, path])
        size += nbytes
        if size >= plan.chunk_bytes:
            chunks.append((current, size))
            current, size = [], 0
    if current:
        chunks.append((current, size))
    return [{"chunk": i, "items": items, "bytes": size} for i, (items, size) in enumerate(chunks)]


def _field_text(record: dict, text_field: str) -> str | None:
    """``a+b`` joins fields; lists of messages/answers are flattened to text."""
    parts = []
    for name in text_field.split("+"):
        if name not in record or record[name] is None:
            return None
        parts.append(_flatten(record[name]))
    return "\n\n".join(p for p in parts if p)


def _flatten(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "role" in value and "content" in value:
            return f"{value['role']}: {_flatten(value['content'])}"
        for key in ("text", "content", "body"):
            if key in value:
                return _flatten(value[key])
        return ""
    if isinstance(value, (list, tuple)):
        return "\n\n".join(_flatten(v) for v in value)
    return str(value)


def _read_text_file(path: str, s_idx: int, f_idx: int) -> Iterator[Doc]:
    doc_id = make_doc_id(s_idx, f_idx, 0)
    size = os.path.getsize(path)
    if size > MAX_DOC_BYTES:
        yield Doc(doc_id, s_idx, None, "too_long", size)
        return
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        yield Doc(doc_id, s_idx, raw.decode("utf-8"), raw_bytes=len(raw))
    except UnicodeDecodeError:
        yield Doc(doc_id, s_idx, None, "invalid_utf8", len(raw))


def _read_jsonl_file(path: str, s_idx: int, f_idx: int, text_field: str) -> Iterator[Doc]:
    with open(path, "rb") as fh:
        record = 0
        while True:
            line = fh.readline(MAX_DOC_BYTES + 1)
            if not line:
                return
            doc_id = make_doc_id(s_idx, f_idx, record)
            record += 1
            if len(line) > MAX_DOC_BYTES and not line.endswith(b"\n"):
                skipped = len(line)
                while line and not line.endswith(b"\n"):  # skip the rest of the giant line
                    line = fh.readline(1 << 20)
                    skipped += len(line)
                yield Doc(doc_id, s_idx, None, "too_long", skipped)
                continue
            if not line.strip():
                record -= 1
                continue
            try:
                obj = json.loads(line.decode("utf-8-sig"))  # -sig: a byte-order mark opening the file
            except UnicodeDecodeError:
                yield Doc(doc_id, s_idx, None, "invalid_utf8", len(line))
                continue
            except json.JSONDecodeError:
                yield Doc(doc_id, s_idx, None, "malformed_json", len(line))
                continue
            text = _field_text(obj, text_field) if isinstance(obj, dict) else None
            if text is None:
                yield Doc(doc_id, s_idx, None, "missing_text", len(line))
            else:
                yield Doc(doc_id, s_idx, _without_surrogates(text), raw_bytes=len(line))


def _without_surrogates(text: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud83d": half an emoji, cut by a scraper);
    json.loads keeps it, and it cannot be encoded (hashing, tokenizing): it becomes '?'."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _read_parquet_file(path: str, s_idx: int, f_idx: int, text_field: str) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    fields = text_field.split("+")
    missing = [f for f in fields if f not in pf.schema_arrow.names]
    record = 0
    for batch in pf.iter_batches(batch_size=1024, columns=None if missing else fields):
        for row in batch.to_pylist():
            doc_id = make_doc_id(s_idx, f_idx, record)
            record += 1
            yield _field_doc(doc_id, s_idx, None if missing else _field_text(row, text_field))


def _field_doc(doc_id: int, s_idx: int, text: str | None) -> Doc:
    """A record's text field (Parquet, HF) as a Doc, or the reason it is skipped."""
    if text is None:
        return Doc(doc_id, s_idx, None, "missing_text")
    if len(text) > MAX_DOC_BYTES:
        return Doc(doc_id, s_idx, None, "too_long", len(text))
    return Doc(doc_id, s_idx, text, raw_bytes=len(text.encode("utf-8", "replace")))


def _read_hf_shard(spec: SourceSpec, s_idx: int, shard: str) -> Iterator[Doc]:
    index, n_shards = (int(x) for x in shard[3:].split("/"))
    stream = _hf_stream(spec)
    if n_shards > 1:
        stream = stream.shard(num_shards=n_shards, index=index)
    for record, row in enumerate(stream):
        doc_id = make_doc_id(s_idx, index, record)
        yield _field_doc(doc_id, s_idx, _field_text(row, spec.text_field))


def read_item(plan: CurationPlan, s_idx: int, f_idx: int, path: str) -> Iterator[Doc]:
    """Documents of one file (or HF shard); an unreadable file is one counted record."""
    spec = plan.sources[s_idx]
    try:
        if spec.format == "hf":
            yield from _read_hf_shard(spec, s_idx, path)
        elif spec.format == "text":
            yield from _read_text_file(path, s_idx, f_idx)
        elif spec.format == "jsonl":
            yield from _read_jsonl_file(path, s_idx, f_idx, spec.text_field)
        else:
            yield from _read_parquet_file(path, s_idx, f_idx, spec.text_field)
    except (OSError, ValueError) as exc:  # permissions, vanished file, corrupt parquet
        if isinstance(exc, ValueError) and "overflows the doc id" in str(exc):
            raise
        yield Doc(make_doc_id(s_idx, f_idx, (1 << RECORD_BITS) - 1), s_idx, None, "unreadable_file")

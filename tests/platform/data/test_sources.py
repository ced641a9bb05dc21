"""Bad input: every malformed record is counted by reason, valid ones are all kept."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mamba_slm.platform.data import sources
from mamba_slm.platform.data.plan import CurationPlan, SourceSpec

GOOD = "A valid document about the weather and the harvest, long enough to keep. " * 5


def make_bad_jsonl(path):
    lines = [json.dumps({"text": GOOD + "one"}).encode(),
             b'{"text": "unterminated',                                  # malformed JSON
             json.dumps({"body": "no text field"}).encode(),             # missing field
             b'{"text": "caf\xff\xfe broken utf-8"}',                    # invalid UTF-8
             b"",                                                        # blank line: not a record
             json.dumps({"text": "x" * (sources.MAX_DOC_BYTES + 10)}).encode(),  # giant
             json.dumps(["not", "an", "object"]).encode(),
             json.dumps({"text": GOOD + "two"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")


def read_all(plan):
    docs = []
    for chunk in sources.plan_chunks(plan):
        for s_idx, f_idx, item in chunk["items"]:
            docs.extend(sources.read_item(plan, s_idx, f_idx, item))
    return docs


def plan_for(*specs):
    return CurationPlan(name="t", sources=specs, target_tokens=None)


def test_jsonl_bad_records_counted_and_valid_kept(tmp_path):
    make_bad_jsonl(tmp_path / "a.jsonl")
    docs = read_all(plan_for(SourceSpec("s", "jsonl", (str(tmp_path / "*.jsonl"),), 1.0)))
    assert [d.text for d in docs if d.text] == [GOOD + "one", GOOD + "two"]
    assert sorted(d.reason for d in docs if d.reason) == sorted(
        ["malformed_json", "missing_text", "invalid_utf8", "too_long", "missing_text"])
    assert len({d.doc_id for d in docs}) == len(docs)


def test_text_parquet_and_unreadable_files(tmp_path):
    (tmp_path / "ok.txt").write_text(GOOD)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    os.symlink(tmp_path / "vanished", tmp_path / "dangling.txt")     # unreadable
    pq.write_table(pa.table({"text": [GOOD, None, GOOD + "!"]}), tmp_path / "a.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "other.parquet")
    plan = plan_for(SourceSpec("txt", "text", (str(tmp_path / "*.txt"),), 1.0),
                    SourceSpec("pq", "parquet", (str(tmp_path / "*.parquet"),), 1.0))
    docs = read_all(plan)
    assert sorted(d.text for d in docs if d.text) == sorted([GOOD, GOOD, GOOD + "!"])
    reasons = sorted(d.reason for d in docs if d.reason)
    assert reasons == ["invalid_utf8", "missing_text", "missing_text", "unreadable_file", "unreadable_file"]


def test_hf_streaming_source_on_local_files(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"{GOOD} {i}"}) for i in range(3)))
    docs = read_all(plan_for(SourceSpec("hf", "hf", ("json", str(tmp_path / "d.jsonl")), 1.0)))
    assert [d.text for d in docs] == [f"{GOOD} {i}" for i in range(3)]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(sources.MissingInputError, match="no input files match"):
        sources.plan_chunks(plan_for(SourceSpec("s", "jsonl", (str(tmp_path / "nope*.jsonl"),), 1.0)))


def test_chunks_interleave_sources(tmp_path):
    for i in range(6):
        (tmp_path / f"a{i}.txt").write_text(GOOD)
        (tmp_path / f"b{i}.md").write_text(GOOD)
    plan = plan_for(SourceSpec("a", "text", (str(tmp_path / "*.txt"),), 1.0),
                    SourceSpec("b", "text", (str(tmp_path / "*.md"),), 1.0)).replace(chunk_bytes=4 * len(GOOD))
    chunks = sources.plan_chunks(plan)
    assert len(chunks) == 3
    assert all({s for s, _, _ in c["items"]} == {0, 1} for c in chunks)

"""The curation job: sources -> clean -> dedup -> tokenizer -> tokenize -> mix/pack -> shards.

Stages run on Ray Data. The per-document stages (clean, tokenize, pack) map over work
chunks, each task streaming one chunk from file to file; the cross-document stage
(dedup) hash-shuffles small (kind, key, doc_id) rows with ``groupby``. Intermediate
files live in ``<output>/_work`` (removed at the end), so memory stays bounded by the
chunk size, not the input size. Outputs follow the "mamba-slm-packed-v1" contract:
``manifest.json``, ``tokenizer.json``, ``train/`` and ``val/`` shards, ``report.json``.
For a multi-node cluster, ``output`` must be on storage every node sees.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from mamba_slm.platform.data import dedup, stages
from mamba_slm.platform.data.plan import CurationPlan
from mamba_slm.platform.data.report import build_report, format_report
from mamba_slm.platform.data.sources import plan_chunks
from mamba_slm.platform.data.tokenizer import eos_id, load_tokenizer, train_bpe

FORMAT = "mamba-slm-packed-v1"
OUTPUT_ENTRIES = ("_work", "train", "val", "manifest.json", "report.json", "tokenizer.json")
STAGING = "_staging"  # <output>/_staging: the build in progress


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS when set, else start a quiet local Ray of our own
    (``address="local"``: a bare ``ray.init()`` would join any cluster some other
    process started on this machine). 2-core machines get 4 logical CPUs: Ray Data
    needs slack for read/write tasks (FIELD-NOTES)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = dict(log_to_driver=False, logging_level="ERROR")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 **kwargs)


def _map_chunks(stage: str, fn, chunks: list[dict], log, **kwargs) -> list:
    """Run ``fn(chunk_spec, **kwargs)`` over chunks as a Ray Data map; results by chunk."""
    import ray.data as rd

    def run(batch: dict) -> dict:
        out = [json.dumps(fn(json.loads(s), **kwargs)) for s in batch["spec"]]
        return {"result": np.asarray(out, dtype=object)}

    ds = rd.from_items([{"spec": json.dumps(c)} for c in chunks], override_num_blocks=len(chunks))
    ds = ds.map_batches(run, batch_size=1, batch_format="numpy", num_cpus=1)
    results, start = [None] * len(chunks), time.perf_counter()
    for n, row in enumerate(ds.iter_rows(), 1):
        res = json.loads(row["result"])
        results[res["chunk"]] = res
        log(f"[{stage}] {n}/{len(chunks)} chunks  {time.perf_counter() - start:6.1f}s")
    return results


def find_removed(chunks: list[dict], output: Path, log) -> dict[str, np.ndarray]:
    """Exact + near-duplicate doc ids over all chunks. The clean tasks wrote their keys
    hash-partitioned into buckets (map side); one task per bucket finds runs of equal
    keys (reduce side). This is the hash shuffle Ray Data's groupby performs, kept on
    disk with deterministic files: measured here, groupby spent 21-47 s on 180k keys on
    2 cores (aggregator actors), this takes a few seconds."""
    buckets = [{"chunk": b} for b in range(len(chunks))]
    found = _map_chunks("dedup", _bucket_edges, buckets, log, output=str(output))
    cat = lambda k, dt: np.concatenate([np.asarray(f[k], dtype=dt) for f in found])  # noqa: E731
    removal = dedup.removal_from_edges(cat("kind", np.int8), cat("root", np.int64), cat("member", np.int64))
    log(f"[dedup] {len(removal['doc_id'])} duplicates ({int(removal['exact'].sum())} exact)")
    return removal


def build_tokenizer(plan: CurationPlan, output: Path, removed: np.ndarray, log):
    """Load the plan's tokenizer, or train a BPE on the clean stage's sample (minus the
    documents dedup removed); saved as <output>/tokenizer.json."""
    import pyarrow.parquet as pq

    cfg = plan.tokenizer
    if cfg.kind == "pretrained":
        tok = load_tokenizer(cfg)
    else:
        texts = []
        for path in sorted((output / "_work" / "sample").glob("chunk-*.parquet")):
            table = pq.read_table(path)
            keep = ~np.isin(table["doc_id"].to_numpy(), removed)
            texts.extend(t for t, k in zip(table["text"].to_pylist(), keep) if k)
        log(f"[tokenizer] training BPE vocab {cfg.vocab_size} on {sum(map(len, texts)) / 1e6:.1f}M chars")
        tok = train_bpe(texts, cfg)
    tok.save(str(output / "tokenizer.json"))
    return tok


def _bucket_edges(spec, output):
    return stages.bucket_edges(spec, Path(output))


def _clean(spec, plan, output, n_buckets, sample_rate):
    return stages.clean_chunk(spec, CurationPlan.from_dict(plan), Path(output), n_buckets, sample_rate)


def _tokenize(spec, output, removed_path, names, plan):
    return stages.tokenize_chunk(spec, Path(output), np.load(removed_path), names, CurationPlan.from_dict(plan))


def _pack(spec, plan, output, ratios, eos, val_threshold):
    return stages.pack_chunk(spec, CurationPlan.from_dict(plan), Path(output), ratios, eos, val_threshold)


def val_threshold(plan: CurationPlan, tokenized: list[dict]) -> float:
    """Documents whose `stages.val_hash` is below this go to val: `val_fraction` of them, or,
    in a corpus so small that none falls below it, the one lowest document (a val split of
    one document rather than none; a one-document corpus gets none). Decided over the whole corpus, not per chunk, so that
    how the files fall into chunks never moves a document between the splits."""
    if plan.val_fraction == 0 or sum(sum(r["docs"].values()) for r in tokenized) < 2:
        return 0.0  # one document is all training data
    if sum(r["val_docs"] for r in tokenized):
        return plan.val_fraction
    return float(np.nextafter(min(r["min_u"] for r in tokenized), 1.0))


def mix_ratios(plan: CurationPlan, available: dict[str, int]) -> list[float]:
    """Copies per document of each source: target / available, capped at max_repeats."""
    targets = plan.source_targets()
    ratios = []
    for s in plan.sources:
        have, want = available.get(s.name, 0), targets[s.name]
        ratios.append(1.0 if want is None or have == 0 else min(plan.max_repeats, want / have))
    return ratios


def _finalize_shards(output: Path, packed: list[dict]) -> dict:
    splits = {}
    for split in ("train", "val"):
        shards = []
        for res in packed:  # chunk order: deterministic names
            entry = res["shards"].get(split)
            if entry is None:
                continue
            rel = f"{split}/shard-{len(shards):05d}.parquet"
            os.replace(entry["tmp"], output / rel)
            shards.append({"path": rel, "rows": entry["rows"], "tokens": entry["tokens"], "sha256": entry["sha256"]})
        splits[split] = {"shards": shards, "rows": sum(s["rows"] for s in shards),
                         "tokens": sum(s["tokens"] for s in shards)}
    return splits


def run_curation(plan: CurationPlan, output: str | Path, log=print, keep_work: bool = False) -> dict:
    """Run the whole plan into ``output``; returns the manifest. Raises
    ``sources.MissingInputError`` before any work if a source matches nothing."""
    import ray.data as rd

    final = Path(output).resolve()
    # Built in a staging folder and moved into place at the end: a run that fails (a bad
    # tokenizer, nothing left after filtering, a crash) leaves the previous dataset as it was.
    output = final / STAGING
    t0 = time.perf_counter()
    chunks = plan_chunks(plan)
    if plan.tokenizer.kind == "pretrained":  # before any work: a wrong path or name fails now
        eos_id(load_tokenizer(plan.tokenizer), plan.tokenizer)
    ensure_ray()
    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own per-chunk progress instead
    shutil.rmtree(output, ignore_errors=True)  # a failed run's staging
    for stage in ("clean", "keys", "sample", "tokens"):
        (output / "_work" / stage).mkdir(parents=True)
    for split in ("train", "val"):
        (output / split).mkdir()
    names = [s.name for s in plan.sources]
    timings = {}

    def timed(stage, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[stage] = round(time.perf_counter() - start, 2)
        return value

    log(f"curating plan {plan.name!r}: {len(plan.sources)} sources, {len(chunks)} chunks -> {final}")
    sample_rate = plan.tokenizer.sample_chars / max(1, sum(c["bytes"] for c in chunks))
    cleaned = timed("clean", _map_chunks, "clean", _clean, chunks, log, plan=plan.to_dict(), output=str(output),
                    n_buckets=len(chunks), sample_rate=sample_rate)
    removal = timed("dedup", find_removed, chunks, output, log)
    removed_path = output / "_work" / "removed.npy"  # sorted ids, O(duplicates), read by every tokenize task
    np.save(removed_path, removal["doc_id"])
    tok = timed("tokenizer", build_tokenizer, plan, output, removal["doc_id"], log)
    eos = eos_id(tok, plan.tokenizer)
    tokenized = timed("tokenize", _map_chunks, "tokenize", _tokenize, chunks, log, output=str(output),
                      removed_path=str(removed_path), names=names, plan=plan.to_dict())
    available = Counter()
    for r in tokenized:
        available.update({k: v + r["docs"][k] for k, v in r["tokens"].items()})  # + one EOS per doc
    ratios = mix_ratios(plan, available)
    packed = timed("pack", _map_chunks, "pack", _pack, chunks, log, plan=plan.to_dict(), output=str(output),
                   ratios=ratios, eos=eos, val_threshold=val_threshold(plan, tokenized))
    splits = _finalize_shards(output, packed)
    if not keep_work:
        shutil.rmtree(output / "_work")
    elapsed = time.perf_counter() - t0
    report = build_report(plan, cleaned, removal, removed_source_names(removal, names), tokenized,
                          available, ratios, packed, splits, timings, elapsed)
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if splits["train"]["rows"] == 0:
        dropped = Counter()
        for d in report["documents"].values():
            dropped.update(d["dropped"])
        kept = sum(d["out"] for d in report["documents"].values())
        raise ValueError(
            f"no training rows: {kept} documents kept, dropped {dict(dropped.most_common(4))}; nothing "
            f"fills one {plan.seq_len}-token row (JSON input must be JSON Lines, one object per line). "
            f"The report is in {output / 'report.json'}; {final} is unchanged")
    manifest = {
        "format": FORMAT, "seq_len": plan.seq_len, "vocab_size": tok.get_vocab_size(), "eos_id": eos,
        "tokenizer": "tokenizer.json", "splits": splits, "plan": plan.to_dict(),
        "documents": report["documents"], "tokens_per_source": report["tokens_per_source"],
    }
    for entry in OUTPUT_ENTRIES:  # the new build replaces the old one (stale shards must not survive)
        target = final / entry
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    for entry in OUTPUT_ENTRIES:
        if (output / entry).exists():
            os.replace(output / entry, final / entry)
    (final / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks completion
    shutil.rmtree(output)
    log(format_report(report))
    return manifest


def removed_source_names(removal: dict, names: list[str]) -> dict[str, Counter]:
    from mamba_slm.platform.data.sources import doc_source

    by_source: dict[str, Counter] = defaultdict(Counter)
    for doc_id, exact in zip(removal["doc_id"].tolist(), removal["exact"].tolist()):
        by_source[names[doc_source(doc_id)]]["duplicate_exact" if exact else "duplicate_near"] += 1
    return by_source

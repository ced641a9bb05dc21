"""Curation benchmarks (prints tables; not a timed test).

1. Tokenization throughput: the job's Ray Data tokenize stage (read Parquet chunks ->
   encode -> write Parquet) versus the same tokenizer's ``encode_batch`` in one process
   on the same text. Ratio per CPU core used (goal >= 0.8).
2. Peak memory of the whole job (driver + the local Ray it starts, summed PSS) at 1x and
   10x input. Goal: 10x < 1.5x the 1x peak (streaming keeps it flat).

"cores" is measured CPU time / wall time (other load on the machine does not inflate
the ratio); run it with the local Ray it starts (RAY_ADDRESS unset) so the Ray processes
are its children and their CPU time is counted.

    python bench/bench_curate.py [--only tokenize|memory] [--mb 8]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from mamba_slm.platform.data.plan import CurationPlan, SourceSpec, TokenizerConfig, demo_plan
from mamba_slm.platform.data.sources import discover_files


def demo_texts() -> list[str]:
    texts = []
    for spec in demo_plan().sources:
        for path in discover_files(spec):
            texts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
    return texts


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its children: the local Ray it started (GCS,
    raylet, workers), so Ray's own overhead counts against the pipeline."""
    total = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def bench_tokenize(work: Path) -> None:
    from mamba_slm.platform.data import pipeline, stages
    from mamba_slm.platform.data.tokenizer import train_bpe

    texts = demo_texts()
    n_chunks = 8
    tok = train_bpe(texts[::7], TokenizerConfig(vocab_size=8192))
    work.mkdir(parents=True)
    tok.save(str(work / "tokenizer.json"))
    for stage in ("clean", "tokens"):
        (work / "_work" / stage).mkdir(parents=True, exist_ok=True)
    for c in range(n_chunks):  # the clean stage's file format, texts dealt round-robin
        part = texts[c::n_chunks]
        pq.write_table(pa.table({"doc_id": np.arange(c, len(texts), n_chunks, dtype=np.int64)[:len(part)],
                                 "source": np.zeros(len(part), np.int16), "text": part}, schema=stages.CLEAN_SCHEMA),
                       stages.work_file(work, "clean", c))
    np.save(work / "removed.npy", np.zeros(0, np.int64))
    rows = []
    for parallel in ("false", "true"):
        os.environ["TOKENIZERS_PARALLELISM"] = parallel
        proc = psutil.Process()
        c0, t0 = proc.cpu_times(), time.perf_counter()
        n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
        wall = time.perf_counter() - t0
        c1 = proc.cpu_times()
        cores = (c1.user + c1.system - c0.user - c0.system) / wall
        rows.append((f"encode_batch, 1 process (parallelism={parallel})", n, wall, cores))
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray, child of this process (see docstring)
    pipeline.ensure_ray()
    chunks = [{"chunk": c} for c in range(n_chunks)]
    pipeline._map_chunks("warmup", pipeline._tokenize, chunks[:4], lambda *_: None, output=str(work),
                         removed_path=str(work / "removed.npy"), names=["demo"])
    cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
    res = pipeline._map_chunks("tokenize", pipeline._tokenize, chunks, lambda *_: None, output=str(work),
                               removed_path=str(work / "removed.npy"), names=["demo"])
    wall = time.perf_counter() - t0
    pipe_cores = (tree_cpu_seconds() - cpu0) / wall
    n_pipe = sum(r["tokens"].get("demo", 0) for r in res)
    assert n_pipe == rows[0][1], (n_pipe, rows[0][1])
    rows.append(("Ray Data tokenize stage (read+encode+write)", n_pipe, wall, pipe_cores))
    print(f"\n{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M chars, BPE vocab 8192, "
          f"{psutil.cpu_count()} cores")
    print(f"{'path':<52}{'tokens':>11}{'seconds':>9}{'cores':>7}{'tok/s':>11}{'tok/s/core':>12}")
    for name, n, wall, cores in rows:
        print(f"{name:<52}{n:>11,}{wall:>9.2f}{cores:>7.2f}{n / wall:>11,.0f}{n / wall / cores:>12,.0f}")
    per_core_direct = rows[0][1] / rows[0][2] / rows[0][3]
    per_core_pipe = n_pipe / wall / pipe_cores
    print(f"ratio per core used (tokens per CPU-second, pipeline / single-thread encode_batch): "
          f"{per_core_pipe / per_core_direct:.2f}  (goal >= 0.8)")
    print(f"ratio of wall throughput (pipeline / parallel encode_batch): "
          f"{(n_pipe / wall) / (rows[1][1] / rows[1][2]):.2f}")


def synthetic_corpus(root: Path, megabytes: float) -> None:
    """Distinct documents of 60 random lines drawn from the plays, as JSONL files."""
    lines = [l for t in demo_texts()[:77] for l in t.splitlines() if len(l.split()) >= 4]
    rng = random.Random(0)
    root.mkdir(parents=True)
    written, part = 0, 0
    while written < megabytes * 1e6:
        with open(root / f"part-{part:04d}.jsonl", "w") as fh:
            for _ in range(400):
                doc = json.dumps({"text": "\n".join(rng.choices(lines, k=60))})
                fh.write(doc + "\n")
                written += len(doc) + 1
        part += 1


def peak_memory_of(cmd: list[str], env: dict, log: Path) -> tuple[float, float, int]:
    """(peak summed PSS of the process tree in GiB, seconds, exit code)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    root, peak, t0 = psutil.Process(proc.pid), 0, time.perf_counter()
    while proc.poll() is None:
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak = max(peak, total)
        time.sleep(0.5)
    return peak / 2**30, time.perf_counter() - t0, proc.returncode


def bench_memory(work: Path, mb: float) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    results = []
    for scale in (1, 10):
        corpus = work / f"corpus{scale}x"
        synthetic_corpus(corpus, mb * scale)
        plan = CurationPlan(name=f"mem{scale}x", target_tokens=None, seq_len=256,
                            tokenizer=TokenizerConfig(vocab_size=4096, sample_chars=2_000_000),
                            sources=(SourceSpec("plays", "jsonl", (str(corpus / "*.jsonl"),), 1.0, quality="book"),))
        (work / f"plan{scale}.json").write_text(json.dumps(plan.to_dict()))
        cmd = [sys.executable, "jobs/curate.py", "--plan", str(work / f"plan{scale}.json"), "--output",
               str(work / f"out{scale}x")]
        peak, secs, rc = peak_memory_of(cmd, env, work / f"log{scale}.txt")
        if rc != 0:
            print(f"{scale}x run failed (rc {rc}):\n" + "\n".join((work / f"log{scale}.txt").read_text().splitlines()[-15:]))
        report = json.loads((work / f"out{scale}x" / "report.json").read_text()) if rc == 0 else {}
        tokens = report.get("splits", {}).get("train", {}).get("tokens", 0)
        results.append((scale, mb * scale, peak, secs, rc, tokens))
    print(f"\n{'input':>7}{'MB':>8}{'peak GiB (PSS, job + its Ray)':>32}{'seconds':>9}{'train tokens':>14}{'rc':>4}")
    for scale, size, peak, secs, rc, tokens in results:
        print(f"{scale:>6}x{size:>8.0f}{peak:>32.2f}{secs:>9.1f}{tokens:>14,}{rc:>4}")
    print(f"10x / 1x peak memory: {results[1][2] / results[0][2]:.2f}  (goal < 1.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["tokenize", "memory"])
    parser.add_argument("--mb", type=float, default=8.0, help="size of the 1x input for the memory bench")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_curate_") as tmp:
        if args.only in (None, "tokenize"):
            bench_tokenize(Path(tmp) / "tok")
        if args.only in (None, "memory"):
            bench_memory(Path(tmp) / "mem", args.mb)


if __name__ == "__main__":
    main()

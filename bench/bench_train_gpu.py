"""Training throughput of jobs/pretrain.py on GPUs: a preset (--size) through Ray Train +
DeepSpeed, ZeRO-2 / ZeRO-3 on one or two GPUs, a few dozen steps each; prints tokens/s,
tokens/s per GPU, MFU and peak memory per GPU (rank 0's) as a table.

    # device machine (2 GPUs): source .whl/install.sh || exit; python bench/bench_train_gpu.py
    python bench/bench_train_gpu.py --steps 30 --seq-len 2048 --micro-batch 4 --cases z2x1,z3x2
    python bench/bench_train_gpu.py --size 2.7B --seq-len 8192 --micro-batch 1 --grad-accum 2 \
        --cases z2x2,z3x2 --activation-checkpointing --steps 14 --warmup-steps 5
    python bench/bench_train_gpu.py --seq-len 8192 --micro-batch 2 --cases z2x1,z2x1+f8   # + float8

Data: a synthetic dataset in the curated format (no corpus or hub needed), vocab 50304.
Every case is a real `python jobs/pretrain.py` subprocess (its own local Ray), so what is
measured is the job users run. Steps before --warmup-steps are left out of the averages
(kernel autotuning, allocator growth). The runs end without a final checkpoint or model
(`--no-save-final`: a 6.7B ZeRO-3 checkpoint is ~90 GB of optimizer state).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {"z2x1": (2, 1), "z3x1": (3, 1), "z2x2": (2, 2), "z3x2": (3, 2)}  # name -> (stage, gpus)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.3B")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=8, help="steps left out of the averages")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per GPU per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--cases", default="z2x1,z3x2",
                   help=f"comma list of {sorted(CASES)}; a case ending in +f8 runs with --float8")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--work-dir", default="/tmp/bench_train_gpu")
    p.add_argument("--case-timeout", type=float, default=None,
                   help="seconds per case; a case stopped by it still reports the steps it logged, "
                        "and its workers' stacks (where a hung case waits)")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark runs on the GPU machine")
    work = Path(args.work_dir)
    data = work / f"data-{args.seq_len}"
    if not (data / "manifest.json").is_file():
        from mamba_slm.platform.train.synthetic import write_synthetic_dataset

        rows = max(256, 2 * args.steps * args.micro_batch * args.grad_accum * 2)
        write_synthetic_dataset(data, seq_len=args.seq_len, vocab_size=50304, train_rows=rows, val_rows=8,
                                shards=2, row_group=64)
    rows = []
    for case in args.cases.split(","):
        if case.removesuffix("+f8") not in CASES:
            p.error(f"--cases: unknown case {case!r}; expected names from {sorted(CASES)}, optionally +f8")
        stage, gpus = CASES[case.removesuffix("+f8")]
        if gpus > torch.cuda.device_count():
            print(f"skip {case}: needs {gpus} GPUs, have {torch.cuda.device_count()}")
            continue
        rows.append(run_case(args, case, stage, gpus, data, work))
        # the table so far after every case: a call cut short by its time limit keeps them
        print_table(rows, torch.cuda.get_device_name(), args)
    return 0


def run_case(args, case: str, stage: int, gpus: int, data: Path, work: Path) -> dict:
    name = f"bench-{case.replace('+', '-')}-{int(time.time())}"
    out = work / name
    cmd = [sys.executable, "jobs/pretrain.py", "--training-config", "small_scale", "--size", args.size,
           "--num-workers", str(gpus), "--use-gpu", "--zero-stage", str(stage),
           "--global-batch-size", str(args.micro_batch * args.grad_accum * gpus),
           "--micro-batch-size", str(args.micro_batch), "--max-steps", str(args.steps),
           "--warmup-steps", "5", "--checkpoint-every", "0", "--data-path", str(data), "--name", name,
           "--output-dir", str(out), "--storage-path", str(work / "storage"), "--no-wandb", "--no-plot",
           "--log-every", "1", "--cpus-per-worker", "4", "--no-save-final"]
    if args.activation_checkpointing:
        cmd.append("--activation-checkpointing")
    if case.endswith("+f8"):
        cmd.append("--float8")
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    # its own process group, so that a timeout also stops the local Ray the job started
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        returncode = proc.wait(timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        # the workers print their stacks first (platform/train/loop.py registers SIGUSR1),
        # so a case that hangs says where
        subprocess.run(["pkill", "-USR1", "-f", "RayTrainWorker"], check=False)
        time.sleep(10)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        returncode = "timeout"
        print_worker_stacks(t0)
    wall = time.time() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    shutil.rmtree(work / "storage", ignore_errors=True)
    shutil.rmtree(out / "model", ignore_errors=True)
    steady = [r for r in records if r["step"] > args.warmup_steps and not r["skipped"]]
    print(f"{case} losses by step: " + " ".join(f"{r['loss']:.2f}" for r in records), flush=True)
    if returncode not in (0, "timeout") or not steady:
        return {"case": case, "stage": stage, "gpus": gpus, "error": f"exit {returncode}", "wall": wall}
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    # wall clock from the first to the last steady step: what the step times leave out
    # (reports, logging, the fault-tolerance all-reduce) included
    wall_tps = ((steady[-1]["tokens_seen"] - steady[0]["tokens_seen"]) / (steady[-1]["time"] - steady[0]["time"])
                if len(steady) > 1 else None)
    mfu = [r["mfu"] for r in steady if r["mfu"] is not None]
    return {"case": case, "stage": stage, "gpus": gpus, "tokens_per_s": tps, "per_gpu": tps / gpus, "wall_tps": wall_tps,
            "mfu": statistics.median(mfu) if mfu else None, "step_s": statistics.median(r["step_time_s"] for r in steady),
            "mem_alloc": max(r.get("mem_allocated_gb", 0) for r in records),
            "mem_reserved": max(r.get("mem_reserved_gb", 0) for r in records),
            "loss": f"{records[0]['loss']:.2f}->{records[-1]['loss']:.2f}", "wall": wall,
            "finished": returncode == 0}


def print_worker_stacks(since: float, ray_tmp: str = "/tmp/ray") -> None:
    """The stack dumps in this case's Ray worker logs (written there, not always forwarded
    to the driver before the kill)."""
    for log in sorted(Path(ray_tmp).glob("session_*/logs/worker-*.err")):
        if log.stat().st_mtime < since:
            continue
        text = log.read_text(errors="replace")
        found = re.search(r"(Current thread|Thread) 0x", text)  # faulthandler's first header
        if found:
            print(f"--- stacks in {log}:\n{text[found.start():found.start() + 6000]}", flush=True)


def print_table(rows: list[dict], device: str, args) -> None:
    print(f"\n{args.size}, seq {args.seq_len}, micro-batch {args.micro_batch} x accum {args.grad_accum} per GPU, "
          f"{args.steps} steps (median over steps > {args.warmup_steps}), {device}")
    head = f"{'case':9} {'ZeRO':>4} {'GPUs':>4} {'tokens/s':>10} {'tok/s/GPU':>10} {'wall tok/s':>10} {'MFU':>6} {'step s':>7} " \
           f"{'alloc GB':>9} {'resv GB':>8} {'loss':>12} {'wall s':>7}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:9} {r['stage']:>4} {r['gpus']:>4}  FAILED ({r['error']}, {r['wall']:.0f}s)")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        wall = "n/a" if r["wall_tps"] is None else f"{r['wall_tps']:,.0f}"
        print(f"{r['case']:9} {r['stage']:>4} {r['gpus']:>4} {r['tokens_per_s']:>10,.0f} {r['per_gpu']:>10,.0f} {wall:>10} "
              f"{mfu:>6} {r['step_s']:>7.2f} {r['mem_alloc']:>9.1f} {r['mem_reserved']:>8.1f} {r['loss']:>12} "
              f"{r['wall']:>7.0f}" + ("" if r["finished"] else "  (stopped by --case-timeout after these steps)"))
    print("tokens/s: median over steps of the step alone; wall tok/s: first to last steady step by the clock\n"
          "memory: peak of rank 0 (torch.cuda.max_memory_allocated / reserved)")


if __name__ == "__main__":
    sys.exit(main())

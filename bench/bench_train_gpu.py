"""Training throughput of jobs/pretrain.py on GPUs: a preset (--size) through Ray Train +
DeepSpeed, ZeRO-2 / ZeRO-3 on one or more GPUs of one machine, a few dozen steps each;
prints tokens/s, tokens/s per GPU, MFU and peak memory per GPU (rank 0's) as a table.

A case is `z<stage>x<gpus>` (z2x1, z3x4, ...), optionally with suffixes: `+f8` runs with
--float8; `+kill` checkpoints every --checkpoint-every steps and, once step --kill-at-step
is logged, SIGKILLs one training worker process from outside (as a crashed process or an
OOM kill would): Ray Train must restart the group from the latest checkpoint and finish.
The table then gives the seconds from the kill to the first step after it, and the step
the run resumed from.

    # device machine (2 GPUs): source .whl/install.sh || exit; python bench/bench_train_gpu.py
    python bench/bench_train_gpu.py --steps 30 --seq-len 2048 --micro-batch 4 --cases z2x1,z3x2
    python bench/bench_train_gpu.py --size 2.7B --seq-len 8192 --micro-batch 1 --grad-accum 2 \
        --cases z2x2,z3x2 --activation-checkpointing --steps 14 --warmup-steps 5
    python bench/bench_train_gpu.py --seq-len 8192 --micro-batch 2 --cases z2x1,z2x1+f8   # + float8
    python bench/bench_train_gpu.py --size 6.7B --seq-len 8192 --micro-batch 1 --grad-accum 2 \
        --activation-checkpointing --cases z3x2,z3x4,z3x4+kill --steps 12 --warmup-steps 5

A/B on one machine: `--base DIR` runs every case first from another tree of this project
(the code to compare against), then from this one, and labels the base rows `case@base`:

    git archive HEAD~1 --prefix=.ab-base/ | tar -x      # an ignored dir; carry it to the device
    python bench/bench_train_gpu.py --base .ab-base --cases z2x1 --seq-len 8192 --micro-batch 2

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
CASE = re.compile(r"z([23])x(\d+)((?:\+f8|\+kill)*)")  # z<ZeRO stage>x<GPUs>[+f8][+kill]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.3B")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=8, help="steps left out of the averages")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per GPU per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--cases", default="z2x1,z3x2",
                   help="comma list of z<stage>x<gpus> (z2x1, z3x2, z3x4...), each optionally +f8 "
                        "(--float8) and/or +kill (one worker SIGKILLed at --kill-at-step)")
    p.add_argument("--kill-at-step", type=int, default=6, help="+kill cases: the step after which a worker dies")
    p.add_argument("--checkpoint-every", type=int, default=4, help="+kill cases: steps between checkpoints")
    p.add_argument("--profile-steps", default="",
                   help="passed to jobs/pretrain.py (e.g. 8-10); the profile summary is printed")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--work-dir", default="/tmp/bench_train_gpu")
    p.add_argument("--base", type=Path, default=None,
                   help="a tree of this project (e.g. from git archive) to run every case from first, "
                        "as the A of an A/B on this machine")
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
    if args.base is not None:
        args.base = args.base.resolve()
        if not (args.base / "jobs" / "pretrain.py").is_file():
            p.error(f"--base {args.base}: not a tree of this project (no jobs/pretrain.py)")
        if os.environ.get("RAY_ADDRESS"):  # workers of a running cluster would not get the base's PYTHONPATH
            p.error("--base needs each case on its own local Ray: unset RAY_ADDRESS")
        for tree in (args.base, REPO):  # which package each side really imports
            print(f"{tree}: imports {package_file(tree, work)}", flush=True)
    cases = args.cases.split(",")
    for case in cases:
        if not CASE.fullmatch(case):
            p.error(f"--cases: unknown case {case!r}; expected z<2|3>x<GPUs> with optional +f8 / +kill, e.g. z3x4+kill")
    for case in cases:
        stage, gpus = (int(g) for g in CASE.fullmatch(case).groups()[:2])
        if gpus > torch.cuda.device_count():
            print(f"skip {case}: needs {gpus} GPUs, have {torch.cuda.device_count()}")
            continue
        for tree in ([args.base] if args.base else []) + [REPO]:
            rows.append(run_case(args, case, stage, gpus, data, work, tree))
        # the table so far after every case: a call cut short by its time limit keeps them
        print_table(rows, torch.cuda.get_device_name(), args)
    return 0


def tree_env(tree: Path, work: Path) -> dict[str, str]:
    """The environment that runs `tree`'s code: for another tree, a directory on PYTHONPATH
    whose `mamba_slm` links to it, ahead of this one (Ray's workers inherit PYTHONPATH)."""
    env = dict(os.environ)
    if tree != REPO:
        pkg = work / "base-pkg"
        pkg.mkdir(parents=True, exist_ok=True)
        link = pkg / "mamba_slm"
        if link.is_symlink() and link.resolve() != tree:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(tree, target_is_directory=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pkg), env.get("PYTHONPATH", "")]))
    return env


def package_file(tree: Path, work: Path) -> str:
    return subprocess.run([sys.executable, "-c", "import mamba_slm.model as m; print(m.__file__)"], cwd=tree,
                          env=tree_env(tree, work), capture_output=True, text=True).stdout.strip()


def run_case(args, case: str, stage: int, gpus: int, data: Path, work: Path, tree: Path = REPO) -> dict:
    label = case if tree == REPO else f"{case}@base"
    name = f"bench-{label.replace('+', '-').replace('@', '-')}-{int(time.time())}"
    out = work / name
    kill = "+kill" in case
    cmd = [sys.executable, "jobs/pretrain.py", "--training-config", "small_scale", "--size", args.size,
           "--num-workers", str(gpus), "--use-gpu", "--zero-stage", str(stage),
           "--global-batch-size", str(args.micro_batch * args.grad_accum * gpus),
           "--micro-batch-size", str(args.micro_batch), "--max-steps", str(args.steps),
           "--warmup-steps", "5", "--checkpoint-every", str(args.checkpoint_every if kill else 0),
           *(["--keep-checkpoints", "1", "--max-failures", "1"] if kill else []), "--data-path", str(data), "--name", name,
           "--output-dir", str(out), "--storage-path", str(work / "storage"), "--no-wandb", "--no-plot",
           "--log-every", "1", "--cpus-per-worker", "4", "--no-save-final"]
    if args.activation_checkpointing:
        cmd.append("--activation-checkpointing")
    if "+f8" in case:
        cmd.append("--float8")
    if args.profile_steps:
        cmd += ["--profile-steps", args.profile_steps]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    # its own process group, so that a timeout also stops the local Ray the job started
    proc = subprocess.Popen(cmd, cwd=tree, env=tree_env(tree, work), start_new_session=True)
    killed_at = None
    try:
        if kill:
            killed_at = kill_a_worker_at(out, args.kill_at_step, proc, t0, args.case_timeout)
        returncode = proc.wait(timeout=None if args.case_timeout is None else
                               max(1.0, args.case_timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        # the workers print their stacks first (platform/train/loop.py registers SIGUSR1),
        # so a case that hangs says where
        subprocess.run(["pkill", "-USR1", "-f", "RayTrainWorker"], check=False)
        time.sleep(10)
        # the case's own processes, found before the kill reparents them: Ray's workers left
        # the driver's process group and, still compiling on the GPU, ran beside the next case
        doomed = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        returncode = "timeout"
        print_worker_stacks(t0)
    wall = time.time() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    shutil.rmtree(work / "storage", ignore_errors=True)
    shutil.rmtree(out / "model", ignore_errors=True)
    steady = [r for r in records if r["step"] > args.warmup_steps and not r["skipped"]]
    print(f"{label} losses by step: " + " ".join(f"{r['step']}:{r['loss']:.3f}" for r in records), flush=True)
    for summary in sorted((out / "profile").glob("*.txt")):
        print(f"--- {summary}\n" + "\n".join(summary.read_text().splitlines()[:45]), flush=True)
    recovery = {}
    if kill:
        after = [r for r in records if killed_at is not None and r["time"] > killed_at]
        recovery = {"killed": killed_at is not None,
                    "recovery_s": after[0]["time"] - killed_at if after else None,
                    "resumed_from": next((r["resumed_from_step"] for r in after if r["resumed_from_step"] is not None), None),
                    # the restarted group's start-up, from its first record (platform/train/loop.py)
                    **{k: next((r[k] for r in after if r.get(k) is not None), None)
                       for k in ("startup_s", "engine_build_s", "checkpoint_load_s")}}
        print(f"{label}: worker killed {'at ' + time.strftime('%X', time.localtime(killed_at)) if killed_at else 'never'}; "
              f"{recovery}", flush=True)
    if returncode not in (0, "timeout") or not steady:
        return {"case": label, "stage": stage, "gpus": gpus, "error": f"exit {returncode}", "wall": wall, **recovery}
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    # wall clock from the first to the last steady step: what the step times leave out
    # (reports, logging, the fault-tolerance all-reduce) included
    wall_tps = ((steady[-1]["tokens_seen"] - steady[0]["tokens_seen"]) / (steady[-1]["time"] - steady[0]["time"])
                if len(steady) > 1 else None)
    mfu = [r["mfu"] for r in steady if r["mfu"] is not None]
    return {"case": label, "stage": stage, "gpus": gpus, "tokens_per_s": tps, "per_gpu": tps / gpus, "wall_tps": wall_tps,
            "mfu": statistics.median(mfu) if mfu else None, "step_s": statistics.median(r["step_time_s"] for r in steady),
            "mem_alloc": max(r.get("mem_allocated_gb", 0) for r in records),
            "mem_reserved": max(r.get("mem_reserved_gb", 0) for r in records),
            "loss": f"{records[0]['loss']:.2f}->{records[-1]['loss']:.2f}", "wall": wall,
            "finished": returncode == 0, **recovery}


def kill_a_worker_at(out: Path, step: int, proc: subprocess.Popen, t0: float, timeout: float | None):
    """Once the run in `out` logs `step`, SIGKILL one Ray Train worker process (the newest);
    returns when it was killed (time.time()), or None if the job ended or timed out first."""
    from mamba_slm.platform.train.metrics import read_metrics

    while proc.poll() is None and (timeout is None or time.time() - t0 < timeout):
        logged = [r["step"] for r in read_metrics(out)]
        if logged and max(logged) >= step:
            pids = subprocess.run(["pgrep", "-n", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
            if pids:
                os.kill(int(pids[0]), signal.SIGKILL)
                print(f"killed worker process {pids[0]} after step {max(logged)}", flush=True)
                return time.time()
        time.sleep(0.5)
    return None


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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
    head = f"{'case':14} {'ZeRO':>4} {'GPUs':>4} {'tokens/s':>10} {'tok/s/GPU':>10} {'wall tok/s':>10} {'MFU':>6} {'step s':>7} " \
           f"{'alloc GB':>9} {'resv GB':>8} {'loss':>12} {'wall s':>7}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:14} {r['stage']:>4} {r['gpus']:>4}  FAILED ({r['error']}, {r['wall']:.0f}s)")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        wall = "n/a" if r["wall_tps"] is None else f"{r['wall_tps']:,.0f}"
        print(f"{r['case']:14} {r['stage']:>4} {r['gpus']:>4} {r['tokens_per_s']:>10,.0f} {r['per_gpu']:>10,.0f} {wall:>10} "
              f"{mfu:>6} {r['step_s']:>7.2f} {r['mem_alloc']:>9.1f} {r['mem_reserved']:>8.1f} {r['loss']:>12} "
              f"{r['wall']:>7.0f}" + ("" if r["finished"] else "  (stopped by --case-timeout after these steps)"))
        if "killed" in r:
            rec = "n/a" if r.get("recovery_s") is None else f"{r['recovery_s']:.0f} s"
            print(f"{'':14} worker SIGKILLed: {r['killed']}; kill -> next step {rec}; resumed from step {r.get('resumed_from')}; "
                  f"new group: start-up {r.get('startup_s')} s, engine build {r.get('engine_build_s')} s, "
                  f"checkpoint load {r.get('checkpoint_load_s')} s")
    print("tokens/s: median over steps of the step alone; wall tok/s: first to last steady step by the clock\n"
          "memory: peak of rank 0 (torch.cuda.max_memory_allocated / reserved)")


if __name__ == "__main__":
    sys.exit(main())

"""Step metrics: throughput, model FLOPs utilisation, memory; console, wandb, JSONL, plot.

MFU = achieved model FLOP/s / peak FLOP/s of the devices (PaLM, Chowdhery et al. 2022,
appendix B). Model FLOPs per token come from `HybridLM.flops_per_token` (6N + attention),
so activation recomputation does not count. Peaks are the dense bf16 (or tf32 for fp32
training) tensor-core numbers of the vendors' data sheets; on a CPU there is no
meaningful peak and MFU is reported as None.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device: (bf16, tf32), from NVIDIA data sheets (SXM parts).
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # H100 PCIe: 756 / 378 (matched first, below)
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A10G": (70e12, 35e12),
    "L4": (121e12, 60e12),
    "V100": (125e12, 15.7e12),  # fp16 tensor cores; no bf16
}


def peak_flops_per_device(use_gpu: bool, precision: str) -> float | None:
    if not use_gpu or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        bf16, tf32 = 756e12, 378e12
    else:
        match = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        if match is None:
            log.warning("no peak FLOP/s known for %r: MFU is reported as None", name)
            return None
        bf16, tf32 = match
    return bf16 if precision == "bf16" else tf32


def memory_gb() -> dict[str, float]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"mem_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    import psutil

    return {"mem_rss_gb": psutil.Process().memory_info().rss / 2**30}


class MetricsLogger:
    """Rank 0's sink for step metrics: console lines, metrics.jsonl, wandb."""

    def __init__(self, output_dir: Path, job_config: dict[str, Any], run_name: str, max_steps: int,
                 use_wandb: bool, wandb_project: str, log_every: int):
        self.output_dir, self.max_steps, self.log_every = output_dir, max_steps, log_every
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "metrics.jsonl", "a")
        self.wandb = _start_wandb(output_dir, job_config, run_name, wandb_project) if use_wandb else None
        from rich.console import Console

        self.console = Console(file=sys.stdout, force_terminal=sys.stdout.isatty(), soft_wrap=True)
        self.t_start = time.perf_counter()

    def log(self, metrics: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:  # x axis: the "step" value (define_metric in _start_wandb)
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        step = metrics["step"]
        if (step % self.log_every == 0 or step == self.max_steps or step == 1 or metrics.get("skipped")
                or "val_loss" in metrics):
            self.console.print(format_line(metrics, self.max_steps, time.perf_counter() - self.t_start),
                               highlight=False)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def close(self) -> None:
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_line(m: dict[str, Any], max_steps: int, elapsed: float) -> str:
    width = len(str(max_steps))
    filled = int(20 * m["step"] / max_steps)
    bar = "[green]" + "█" * filled + "[/green][dim]" + "░" * (20 - filled) + "[/dim]"
    mfu = "  mfu n/a" if m.get("mfu") is None else f"  mfu {100 * m['mfu']:.1f}%"
    mem = m.get("mem_allocated_gb", m.get("mem_rss_gb", 0.0))
    gn = m.get("grad_norm")
    skipped = f"  [red]skipped ({m['skip_reason']})[/red]" if m.get("skipped") else ""
    val = f"  [cyan]val {m['val_loss']:.4f}[/cyan]" if "val_loss" in m else ""
    return (f"{bar} step {m['step']:>{width}}/{max_steps}  loss {m['loss']:.4f}{val}  lr {m['lr']:.2e}  "
            f"gnorm {'-' if gn is None else f'{gn:.3f}'}  tok/s {m['tokens_per_s']:,.0f}{mfu}  "
            f"mem {mem:.2f} GB  {elapsed:.0f}s{skipped}")


def _start_wandb(output_dir: Path, config: dict[str, Any], name: str, project: str):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: metrics go to the console and metrics.jsonl only")
        return None
    # Online only with a key; offline runs can be synced later with `wandb sync`.
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project=project, name=name, config=config, dir=str(output_dir), mode=mode,
                     resume="allow", id=_wandb_id(name))
    # Plot against our own "step", not wandb's step counter: a run restarted from a checkpoint
    # logs its redone steps again under the same run id, and wandb drops data logged at a step
    # below its counter ("Steps must be monotonically increasing"): their val_loss, startup_s
    # and resumed_from_step never showed.
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _wandb_id(name: str) -> str:
    import hashlib

    return hashlib.sha1(name.encode()).hexdigest()[:16]  # same run id across resumes


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """Step metrics of a run, last record per step (a resumed run rewrites its steps)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            by_step[m["step"]] = m
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(output_dir: Path) -> Path | None:
    records = read_metrics(output_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    ax_loss.plot(steps, [m["loss"] for m in records], lw=1, label="train")
    val = [m for m in records if "val_loss" in m]
    if val:
        ax_loss.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", ms=3, lw=1, label="val")
    bad = [m for m in records if m.get("skipped")]
    if bad:
        ax_loss.scatter([m["step"] for m in bad], [0] * len(bad), marker="x", c="r", label="skipped")
    if val or bad:
        ax_loss.legend()
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [m["lr"] for m in records], c="tab:orange", lw=1)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    out = Path(output_dir) / "loss_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

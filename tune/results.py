"""What a sweep leaves behind, read back from its Tune experiment directory:

    <sweep dir>/trials.csv        one row per trial (also printed)
    <sweep dir>/sweep.png         validation loss vs attention fraction / placement, and vs lr
    <sweep dir>/best_layout.json  the winning layout, for `jobs/pretrain.py --layout-from`

Trials are ranked by their last validation loss among those that trained the full step
budget (ASHA stops the others at an earlier rung, where losses are not comparable).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SweepConfig
from .space import is_pattern
from .trial import EVENTS_FILE

TABLE_FILE, PLOT_FILE, BEST_FILE = "trials.csv", "sweep.png", "best_layout.json"
LAYOUT_FORMAT = "mamba-slm-layout-v1"
COLUMNS = ("trial_id", "status", "layout", "attn_ratio", "layer_pattern", "attn_fraction", "lr",
           "warmup_steps", "step", "val_loss", "val_ppl", "train_loss", "full_budget", "runs",
           "time_s")


@dataclass
class SweepResults:
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    unfinished: int


def collect_results(cfg: SweepConfig) -> SweepResults:
    """One row per trial of the Tune experiment in `cfg.output_dir` (the directory is the
    record: the report of an interrupted or remote sweep can be rebuilt from it alone)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(cfg.output_dir, default_metric="val_loss", default_mode="min")
    extra = [f"model.{k}" for k in cfg.space.model_choices] + [f"training.{k}" for k in cfg.space.training_choices]
    rows = []
    for trial in analysis.trials:
        r, c = trial.last_result or {}, trial.config
        row = {
            "trial_id": trial.trial_id, "status": trial.status,
            "layout": "verbatim" if is_pattern(c["layout"]) else c["layout"],
            "attn_ratio": None if is_pattern(c["layout"]) else c.get("attn_ratio"),
            "layer_pattern": r.get("layer_pattern", c["layout"] if is_pattern(c["layout"]) else ""),
            "attn_fraction": r.get("attn_fraction"), "lr": c["lr"], "warmup_steps": r.get("warmup_steps"),
            "step": r.get("step", 0), "val_loss": r.get("val_loss"), "val_ppl": r.get("val_ppl"),
            "train_loss": r.get("train_loss"), "full_budget": r.get("step", 0) >= cfg.steps,
            "runs": count_starts(cfg.trial_dir(trial.trial_id)), "time_s": r.get("trial_time_s"),
            "n_layers": r.get("n_layers"), **{k: c.get(k) for k in extra},
        }
        rows.append(row)
    rows.sort(key=lambda x: (not x["full_budget"], _loss(x)))
    unfinished = sum(1 for x in rows if x["status"] != "TERMINATED")
    done = [x for x in rows if x["status"] == "TERMINATED" and x["val_loss"] is not None]
    top_step = max((x["step"] for x in done), default=0)
    ranked = sorted((x for x in done if x["step"] == top_step), key=_loss)
    return SweepResults(rows, ranked[0] if ranked else None, unfinished)


def count_starts(trial_dir: Path) -> int:
    """How many times a trial's function started (trial.py logs each start)."""
    path = Path(trial_dir) / EVENTS_FILE
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if json.loads(line)["event"] == "start")


def _loss(row: dict[str, Any]) -> float:
    v = row.get("val_loss")
    return math.inf if v is None or not math.isfinite(v) else v


def write_results(cfg: SweepConfig, results: SweepResults, log=print) -> None:
    out = Path(cfg.output_dir)
    columns = list(COLUMNS) + [k for k in results.rows[0] if k not in COLUMNS and k != "n_layers"] \
        if results.rows else list(COLUMNS)
    with open(out / TABLE_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results.rows)
    log(format_table(results.rows, columns))
    log(f"table: {out / TABLE_FILE}")
    if plot_sweep(cfg, results, out / PLOT_FILE):
        log(f"plot:  {out / PLOT_FILE}")
    if results.best is not None:
        best = best_layout(cfg, results)
        (out / BEST_FILE).write_text(json.dumps(best, indent=2))
        log(f"best:  {results.best['layer_pattern']} ({results.best['layout']}), lr {results.best['lr']:.3g}, "
            f"val loss {results.best['val_loss']:.4f} -> {out / BEST_FILE}\n"
            f"       python jobs/pretrain.py --layout-from {out} --size <target> ...")


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(x) for x in cells])


def best_layout(cfg: SweepConfig, results: SweepResults) -> dict[str, Any]:
    """The file `--layout-from` reads. Layouts are carried as the attention fraction the
    proxy really had (its sampled ratio rounded to whole layers) and the placement rule,
    so a deeper target re-derives them; the proxy's pattern goes verbatim only to a model
    of the same depth. A verbatim winner has no rule: `rule_fallback` is the best
    rule-derived trial, used for targets of another depth."""
    best = results.best
    assert best is not None
    rules = [r for r in results.rows if r["status"] == "TERMINATED" and r["layout"] != "verbatim"
             and r["step"] == best["step"] and r["val_loss"] is not None]
    rule_best = min(rules, key=_loss) if rules else None
    d = {"format": LAYOUT_FORMAT, "sweep": cfg.name, "proxy": cfg.proxy, "metric": "val_loss",
         "complete": results.unfinished == 0,  # False: best so far of an interrupted sweep
         **_layout_entry(best),
         "model_overrides": {k.split(".", 1)[1]: best[k] for k in best if k.startswith("model.")},
         "training": {"lr": best["lr"], "warmup_steps": best["warmup_steps"], "steps": cfg.steps,
                      **{k.split(".", 1)[1]: best[k] for k in best if k.startswith("training.")}}}
    if best["layout"] == "verbatim" and rule_best is not None:
        d["rule_fallback"] = _layout_entry(rule_best)
    return d


def _layout_entry(row: dict[str, Any]) -> dict[str, Any]:
    return {"trial_id": row["trial_id"], "val_loss": row["val_loss"], "step": row["step"],
            "layer_pattern": row["layer_pattern"], "n_layers": row["n_layers"],
            "attn_placement": None if row["layout"] == "verbatim" else row["layout"],
            "attn_ratio": row["attn_fraction"]}


def plot_sweep(cfg: SweepConfig, results: SweepResults, path: Path) -> bool:
    rows = [r for r in results.rows if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = sorted({r["layout"] for r in rows})
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(layouts)}
    # Small horizontal offsets keep placements at the same attention fraction apart.
    offset = {name: 0.006 * (i - len(layouts) / 2) for i, name in enumerate(layouts)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name in layouts:
        mine = [r for r in rows if r["layout"] == name]
        for full in (True, False):
            pts = [r for r in mine if r["full_budget"] == full]
            if not pts:
                continue
            style = dict(color=colors[name], s=36, label=name if full or not any(r["full_budget"] for r in mine) else None,
                         facecolors=colors[name] if full else "none", edgecolors=colors[name])
            axes[0].scatter([r["attn_fraction"] + offset[name] for r in pts],
                            [r["val_loss"] for r in pts], **style)
            axes[1].scatter([r["lr"] for r in pts], [r["val_loss"] for r in pts], **{**style, "label": None})
    if results.best is not None:
        b = results.best
        axes[0].scatter([b["attn_fraction"] + offset[b["layout"]]], [b["val_loss"]], marker="*", s=220, color="gold",
                        edgecolors="black", zorder=3, label=f"best {b['layer_pattern']}")
        axes[1].scatter([b["lr"]], [b["val_loss"]], marker="*", s=220, color="gold", edgecolors="black", zorder=3)
    axes[0].set_xlabel("attention fraction of layers")
    axes[0].set_ylabel(f"validation loss (filled: {cfg.steps} steps; hollow: stopped early)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("peak learning rate")
    axes[0].legend(title="placement", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {cfg.name}: {cfg.proxy}, {len(rows)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

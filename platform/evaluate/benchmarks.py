"""The benchmark suite: which lm-eval tasks, which metric each reports, the seed's GPT-3
reference column, the offline check, the run and the table.

Standard tasks download their data from the Hugging Face hub. Offline (no route to the
hub, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set), every requested hub task is probed
against the local datasets cache first; any that would need a download stop the run with
`NeedsDownload`, naming them, before a model is loaded. The project's local tasks
(`local_tasks`) always run offline.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .local_tasks import materialize

HUB_HOST = "huggingface.co"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class Benchmark:
    name: str                   # as printed
    task: str                   # lm-eval task or group name
    folder: str | None          # lm-eval's tasks/ subfolder holding it (None: a local task)
    metric: str                 # lm-eval metric reported in the table
    reference: float | None = None  # GPT-3 column of the seed (percent)
    unsafe: bool = False        # runs model-written code (lm-eval's confirm_run_unsafe_code)


# The seed's suite of ten. TruthfulQA is reported as MC2 (the Open LLM Leaderboard's
# choice); the reference column is the seed's, GPT-3 175B with the seed's shot counts.
SUITE: tuple[Benchmark, ...] = (
    Benchmark("MMLU", "mmlu", "mmlu/default", "acc", 43.7),
    Benchmark("HellaSwag", "hellaswag", "hellaswag", "acc_norm", 78.8),
    Benchmark("ARC-Easy", "arc_easy", "arc", "acc", 68.3),
    Benchmark("ARC-Challenge", "arc_challenge", "arc", "acc_norm", 51.0),
    Benchmark("TruthfulQA", "truthfulqa_mc2", "truthfulqa", "acc", 28.0),
    Benchmark("HumanEval", "humaneval", "humaneval", "pass@1", 20.0, unsafe=True),
    Benchmark("PIQA", "piqa", "piqa", "acc_norm"),
    Benchmark("WinoGrande", "winogrande", "winogrande", "acc"),
    Benchmark("LAMBADA", "lambada_openai", "lambada", "acc"),
    Benchmark("BoolQ", "boolq", "super_glue/boolq", "acc"),
)
LOCAL: tuple[Benchmark, ...] = (
    Benchmark("Facts MC (chance 25%)", "mamba_slm_facts_mc", None, "acc"),
    Benchmark("Facts perplexity", "mamba_slm_facts_ppl", None, "word_perplexity"),
    Benchmark("Facts generation", "mamba_slm_facts_gen", None, "exact_match"),
)
PERCENT_METRICS = ("acc", "acc_norm", "exact_match", "pass@1", "pass@10")


class NeedsDownload(RuntimeError):
    def __init__(self, missing: dict[str, str]):
        self.missing = missing
        lines = "\n".join(f"  - {task}: {why}" for task, why in missing.items())
        super().__init__(
            f"offline: the Hugging Face hub is not reachable (or {'/'.join(OFFLINE_VARS)} is set) and "
            f"these lm-eval tasks need to download their data:\n{lines}\n"
            f"Run them where the hub is reachable (a run there fills the datasets cache, which later "
            f"offline runs reuse), or evaluate offline with the project's local tasks:\n"
            f"  python jobs/evaluate.py --checkpoint <dir> --benchmarks local")


def select(spec: str) -> list[Benchmark]:
    """'all' (the ten), 'local' (the shipped tasks), or a comma list of names / lm-eval
    task names from either; raises ValueError naming the unknown ones."""
    known = {b.task.lower(): b for b in SUITE + LOCAL} | {b.name.lower(): b for b in SUITE + LOCAL}
    chosen: list[Benchmark] = []
    unknown = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        group = {"all": SUITE, "local": LOCAL}.get(item.lower())
        picks = group if group else ((known[item.lower()],) if item.lower() in known else ())
        if not picks:
            unknown.append(item)
        chosen += [b for b in picks if b not in chosen]
    if unknown or not chosen:
        names = ", ".join(b.task for b in SUITE + LOCAL)
        raise ValueError(f"--benchmarks {spec!r}: unknown {unknown or 'empty'}; use 'all', 'local' or "
                         f"a comma list of: {names}")
    return chosen


def hub_online(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def force_offline() -> None:
    """Offline mode for huggingface_hub / datasets, also when they are already imported
    (both read the variables at import time): no retries against an unreachable host."""
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def task_manager(benchmarks: list[Benchmark], workdir: str | Path):
    """A TaskManager indexing only the lm-eval folders needed (indexing all of lm-eval's
    ~10k task files takes a minute) plus the local tasks, materialised in `workdir`."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    root = Path(lm_eval.__file__).parent / "tasks"
    paths = sorted({str(root / b.folder) for b in benchmarks if b.folder})
    if any(b.folder is None for b in benchmarks):
        paths.append(str(materialize(Path(workdir) / "local_tasks")))
    return TaskManager(include_path=paths, include_defaults=False)


def probe_offline(benchmarks: list[Benchmark], manager) -> None:
    """Build each hub task from the local cache; raise NeedsDownload for those that can't."""
    missing = {}
    for b in benchmarks:
        if b.folder is None:
            continue
        try:
            manager.load([b.task])
        except Exception as exc:  # noqa: BLE001 - datasets raises several types here
            missing[b.task] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if missing:
        raise NeedsDownload(missing)


def run(lm, benchmarks: list[Benchmark], *, num_fewshot: int | None = None, limit: float | None = None,
        allow_code_execution: bool = False, bootstrap_iters: int = 1000, online: bool | None = None) -> dict:
    """Evaluate on `benchmarks`; returns lm-eval's results dict. `lm` is an lm-eval LM or a
    zero-argument callable that builds one: it is called only after the offline check has
    passed, so a missing download is reported before a large model is loaded."""
    import lm_eval
    if online is None:
        online = hub_online()
    if not online:
        force_offline()
    if allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # HF `evaluate`'s code_eval refuses without it
    with tempfile.TemporaryDirectory(prefix="mamba-slm-tasks-") as workdir:
        manager = task_manager(benchmarks, workdir)
        if not online:
            probe_offline(benchmarks, manager)
        return lm_eval.simple_evaluate(
            model=lm() if callable(lm) else lm, tasks=[b.task for b in benchmarks], task_manager=manager,
            num_fewshot=num_fewshot, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False,
            confirm_run_unsafe_code=allow_code_execution)


def score(results: dict, b: Benchmark) -> float | None:
    """The benchmark's metric from lm-eval's results (percent for accuracies)."""
    row = results.get("results", {}).get(b.task) or {}
    for key, value in row.items():
        if key.split(",")[0] == b.metric and isinstance(value, (int, float)):
            return 100 * value if b.metric in PERCENT_METRICS else value
    return None


def format_table(results: dict | None, benchmarks: list[Benchmark], skipped: dict[str, str] | None = None) -> str:
    skipped = skipped or {}
    rows = [("Benchmark", "lm-eval task", "metric", "this model", "GPT-3 (seed)")]
    for b in benchmarks:
        value = skipped.get(b.task) or (score(results or {}, b))
        shown = value if isinstance(value, str) else ("n/a" if value is None else f"{value:.2f}")
        ref = "-" if b.reference is None else (f"~{b.reference:.0f}" if b.name == "HumanEval" else f"{b.reference:.1f}")
        rows.append((b.name, b.task, b.metric, shown, ref))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


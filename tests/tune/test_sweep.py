"""A real sweep on the session's Ray cluster: 3 trials of the tiny preset (Optuna TPE +
ASHA), interrupted with Ctrl-C (SIGINT) while a trial trains after another finished, then resumed
with --resume. Finished trials must not run again; the table, the plot and
best_layout.json must land; and pretrain must start from that file."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from mamba_slm.model import ModelConfig
from mamba_slm.platform.train.synthetic import write_synthetic_dataset
from mamba_slm.tune.layout import apply_layout

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS, RUNGS, TRIALS = 6, 2, 3  # 2 at a time: the third starts once one has finished


def _starts(sweep: Path) -> dict[str, int]:
    return {p.parent.name: sum(json.loads(x)["event"] == "start" for x in p.read_text().splitlines())
            for p in sweep.glob("trials/*/events.jsonl")}


def _training_after_a_finish(sweep: Path) -> bool:
    """A trial finished, and one that started after that finish has not finished."""
    events = {p.parent.name: [json.loads(x) for x in p.read_text().splitlines()]
              for p in sweep.glob("trials/*/events.jsonl")}
    finishes = [e["time"] for ev in events.values() for e in ev if e.get("step") == STEPS]
    return bool(finishes) and any(
        ev[0]["event"] == "start" and ev[0]["time"] > min(finishes) and not any(e.get("step") == STEPS for e in ev)
        for ev in events.values())


def test_sweep_interrupted_resumed_then_pretrain_takes_its_layout(ray_cluster, repo_root, tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", seq_len=64, vocab_size=256, train_rows=256,
                                   val_rows=16, shards=1, row_group=64)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "jobs/tune_sweep.py", "--proxy", "tiny", "--trials", str(TRIALS), "--steps", str(STEPS),
           "--rungs", str(RUNGS), "--global-batch-size", "8", "--micro-batch-size", "4", "--eval-batches", "2",
           "--patterns", "AMMM,MMMA", "--attn-ratios", "0.25,0.5", "--searcher", "optuna",
           "--max-concurrent", "2", "--cpus-per-trial", "1", "--data-path", str(data), "--output-dir", str(sweep)]
    env = dict(os.environ)  # RAY_ADDRESS: the jobs join the session's cluster
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 480  # generous: a loaded 2-core CI machine
    # Interrupt once a trial has finished and a later one is training (it started after
    # that finish), so that both kinds of trial are there to resume.
    while not _training_after_a_finish(sweep) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert _training_after_a_finish(sweep), (tmp_path / "first.log").read_text()[-3000:]
    time.sleep(0.5)  # a trial's first rung takes >= 2 s, so it is still training
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    try:  # Tune saves the experiment, the wandb actors flush, the results are written
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the sweep did not exit within 300 s of Ctrl-C:\n" + (tmp_path / "first.log").read_text()[-4000:])
    print(f"sweep exited {code} {time.time() - t0:.0f} s after Ctrl-C")
    assert code == 1, (tmp_path / "first.log").read_text()[-3000:]
    from ray.tune import ExperimentAnalysis

    status = {t.trial_id: t.status for t in ExperimentAnalysis(str(sweep)).trials}
    finished_before = {t for t, s in status.items() if s == "TERMINATED"}
    started_before = set(_starts(sweep))
    assert finished_before and len(finished_before) < TRIALS, status
    assert started_before - finished_before, f"no trial was training at the interrupt: {status}"

    resumed = subprocess.run([sys.executable, "jobs/tune_sweep.py", "--resume", "--output-dir", str(sweep)],
                             cwd=repo_root, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    starts = _starts(sweep)
    assert len(starts) == TRIALS
    # A trial runs once, once more if the interrupt caught it training, and once more per
    # failure Tune retried (FailureConfig(max_failures=1); its error is shown as a warning).
    retries = {t.trial_id: t.num_failures for t in ExperimentAnalysis(str(sweep)).trials}
    errors = "\n".join(p.read_text()[-2000:] for p in sweep.glob("*/error.txt"))
    if any(retries.values()):
        warnings.warn(f"trials retried after a failure: {retries}\n{errors}")
    for trial in finished_before:
        assert starts[trial] == 1 + retries[trial], f"finished trial {trial} ran again: {starts}"
    for trial in started_before - finished_before:  # interrupted: continued once more
        assert starts[trial] == 2 + retries[trial], (
            starts, retries, errors, (sweep / "trials" / trial / "events.jsonl").read_text(),
            resumed.stdout[-4000:], resumed.stderr[-4000:])

    rows = list(csv.DictReader(open(sweep / "trials.csv")))
    assert len(rows) == TRIALS and {r["status"] for r in rows} == {"TERMINATED"}
    assert all(float(r["val_loss"]) > 0 and int(r["runs"]) >= 1 for r in rows)
    assert "val_loss" in resumed.stdout and "best:" in resumed.stdout
    assert (sweep / "sweep.png").stat().st_size > 10_000
    assert list((sweep / "wandb").glob("offline-run-*")), "no wandb runs logged"
    best = json.loads((sweep / "best_layout.json").read_text())
    full = [r for r in rows if r["full_budget"] == "True"]
    assert best["val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in full))
    assert best["n_layers"] == 4 and len(best["layer_pattern"]) == 4 and best["step"] == STEPS

    # Same depth: the pattern goes verbatim; 24 layers: re-derived from ratio + placement.
    assert apply_layout({}, sweep, "tiny") == {"layer_pattern": best["layer_pattern"]}
    if best["attn_placement"] is not None or "rule_fallback" in best:
        deep = ModelConfig.from_name("1.3B", **apply_layout({}, sweep, "1.3B"))
        rule = best if best["attn_placement"] is not None else best["rule_fallback"]
        assert deep.layer_pattern.count("A") == round(rule["attn_ratio"] * 24)

    out = tmp_path / "pretrain"
    run = subprocess.run([sys.executable, "jobs/pretrain.py", "--size", "tiny", "--layout-from", str(sweep),
                          "--data-path", str(data), "--num-workers", "0", "--max-steps", "2",
                          "--global-batch-size", "4", "--micro-batch-size", "4", "--no-wandb", "--no-plot",
                          "--name", "from-sweep", "--output-dir", str(out)],
                         cwd=repo_root, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    saved = json.loads((out / "model" / "config.json").read_text())["model"]
    assert saved["layer_pattern"] == best["layer_pattern"]

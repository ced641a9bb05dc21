"""`python jobs/chaos.py` on the session's Ray cluster: a short campaign whose plan (seed 1)
SIGKILLs rank 0 after step 3 and SIGTERMs rank 1 after step 5 of the first submission;
the resubmission gets 1 worker (--min-workers 1), so it resumes the 2-worker checkpoint
through DeepSpeed's universal format. The job must survive both faults with an exact
ledger and end with its one-line summary."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_chaos_campaign_survives_and_shrinks(ray_cluster, repo_root, tmp_path):
    cmd = [sys.executable, "jobs/chaos.py", "--seed", "1", "--steps", "8", "--crashes", "1", "--preemptions", "1",
           "--workers", "2", "--min-workers", "1", "--checkpoint-every", "2", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_ADDRESS": ray_cluster["address"]})
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert run.stdout.strip().splitlines()[-1] == "faults injected 2, survived 2, samples lost 0, repeated 0"
    first = re.search(r"submission 1 on 2 worker\(s\): ended at step [56] .*", out)
    assert first and "preempted: no" not in first.group(0), out[-4000:]
    assert re.search(r"submission 2 on 1 worker\(s\): ended at step 8", out), out[-4000:]


def test_chaos_refuses_bad_arguments(repo_root):
    run = subprocess.run([sys.executable, "jobs/chaos.py", "--workers", "2", "--min-workers", "3"],
                         cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--min-workers 3 must be between 0 and --workers (2)" in run.stderr


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
def test_chaos_on_gpus_needs_a_gpu_per_worker(repo_root):
    run = subprocess.run([sys.executable, "jobs/chaos.py", "--use-gpu", "--workers", "2"],
                         cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--use-gpu needs a GPU per worker: 2 workers" in run.stderr

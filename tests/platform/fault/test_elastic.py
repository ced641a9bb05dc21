"""Fault-injection test 2 of issue 5: a node joins, hosts a worker, dies; training goes on
on the remaining capacity, and grows back when a node returns.

A second Ray node joins the session's cluster (`ray start --address ... --block`) with 3
logical CPUs. Each worker reserves 3 CPUs, so of the run's two workers one fits on the
head (4 CPUs) and the other lands on the new node. The run is elastic (2 workers, at
least 1). After step 3 the worker on the new node kills its raylet (SIGKILL, no notice):
Ray Train restarts the worker group with the one worker that still fits, DeepSpeed's
ZeRO state written by 2 workers is resumed on 1 through a universal checkpoint, and
training goes on (paced, so that the test can bring a node back): then the run grows to 2
workers again. The global batch stays 8 throughout (gradient accumulation adapts), the
ledger holds every sample once, and losses and weights track an uninterrupted 2-worker
run to fp32 rounding (only the order of the gradient sums differs).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mamba_slm.platform.fault.inject import KillNodeAtStep, PaceWhileSmall, fired
from mamba_slm.platform.fault.integrity import verify_checkpoint
from mamba_slm.platform.fault.ledger import audit_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS, BATCH, KILL_AT = 8, 8, 3  # as conftest.run_tiny


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """A worker node joined to the session's cluster, on its own ports."""

    def __init__(self, address: str, cpus: int, log: Path):
        import ray

        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        ports = [f"--{name}={_free_port()}" for name in (
            "node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port")]
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", f"--address={address}", f"--num-cpus={cpus}",
             "--block", "--disable-usage-stats", *ports],
            stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ})
        deadline = time.monotonic() + 120
        while True:
            new = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before]
            if new:
                self.node_id = new[0]
                return
            assert self.proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the second node did not join within 120 s"
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the node is left
        except ProcessLookupError:
            pass
        self.proc.wait()


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_node_lost_then_back_training_shrinks_and_grows(ray_cluster, synthetic_data, tmp_path, fault_run,
                                                        baseline, baseline_losses):

    nodes = [Node(ray_cluster["address"], cpus=3, log=tmp_path / "node.log")]
    markers, out = tmp_path / "kills", tmp_path / "elastic"
    # Paced while small: about a minute for the node to come back before the run could end.
    hooks = [KillNodeAtStep(KILL_AT, nodes[0].node_id, markers), PaceWhileSmall(workers=2, seconds=12.0)]
    outcome: dict = {}

    def train():
        try:
            # Each worker reserves 3 CPUs: one fits on the head (4), the other on the new node.
            outcome["result"] = fault_run(synthetic_data, tmp_path, "elastic", hooks, min_workers=1,
                                          cpus_per_worker=3, resize_every_s=5, max_failures=4)
        except BaseException as err:  # surfaced by the main thread
            outcome["error"] = err

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        deadline = time.monotonic() + 400
        while trainer.is_alive() and not any(r["workers"] == 1 for r in _records(out)):
            assert time.monotonic() < deadline, "the run never went on with 1 worker"
            time.sleep(0.5)
        nodes[0].stop()
        if trainer.is_alive():
            nodes.append(Node(ray_cluster["address"], cpus=3, log=tmp_path / "node.log"))  # capacity returns
        trainer.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not trainer.is_alive(), "the elastic run did not finish within 400 s"
    finally:
        for node in nodes:
            node.stop()
    if "error" in outcome:
        raise outcome["error"]

    assert fired(markers) == [f"node-killed-step{KILL_AT}"]
    records = _records(out)
    workers = [r["workers"] for r in records]
    phases = [w for i, w in enumerate(workers) if i == 0 or w != workers[i - 1]]
    print(f"workers per logged step: {workers}")
    assert phases == [2, 1, 2], f"expected 2 -> 1 -> 2 workers, got {workers}"
    assert records[-1]["step"] == STEPS and outcome["result"].last["step"] == STEPS
    assert all(r["tokens_seen"] == r["step"] * BATCH * 64 for r in records), "the global batch changed"

    final = tmp_path / "storage" / "elastic" / f"step_{STEPS:08d}"
    assert verify_checkpoint(final) == ""
    audit = audit_checkpoint(final)
    assert audit.expected == STEPS * BATCH and audit.lost == 0 and audit.repeated == 0, audit

    for r in records:  # every logged step, on 2 or 1 workers, is the uninterrupted run's step
        assert r["loss"] == pytest.approx(baseline_losses[r["step"]], rel=1e-5), (r["step"], r["workers"])
    got = load_file(str(out / "model" / "model.safetensors"))
    worst = max((baseline[k] - got[k]).abs().max().item() for k in baseline)
    print(f"largest weight difference to the uninterrupted run: {worst:.2e}")
    assert baseline.keys() == got.keys() and worst < 1e-5

"""Shared fixtures: one local Ray cluster for the whole test session.

The cluster is started with `ray start --head` (not `ray.init()` in-process) so that the
same cluster serves in-process drivers (`ray.init(address="auto")`), `ray job submit`
through the dashboard, and extra nodes joined with `ray start --address`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Token auth must be configured the same for server and clients (FIELD-NOTES);
    # tests run on loopback only, so it is off here. Real clusters keep it on.
    "RAY_AUTH_MODE": "disabled",
    "WANDB_MODE": "offline",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train's controller polls its workers every 2 s by default: each run waits up to a
    # poll for its start, every failure and its end, and a worker's ray.train.report waits
    # for the controller to take the previous one (platform/train/loop.py). Tests run dozens
    # of tiny runs whose steps take ~0.1 s, so the polls were most of their time after
    # start-up; 0.5 s saves ~5-10 s a run. The loop reads the same variable for its
    # reporting cadence. Propagated by Ray Train to its controller and workers.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
if not torch.cuda.is_available():  # on a GPU machine the GPU tests need DeepSpeed on CUDA
    RAY_ENV["DS_ACCELERATOR"] = "cpu"
os.environ.update(RAY_ENV)
# Processes Ray starts (job entrypoints run `python ...`) must find this interpreter and
# its packages even when the venv is not activated (`make test` calls .venv/bin/python).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# That PATH also puts this environment's ninja first. DeepSpeed JIT-builds its C++ ops when
# first used (cached in TORCH_EXTENSIONS_DIR; the shared-memory comm op it built on every
# initialize is skipped since e2ba386, `engine.skip_shm_comm_op`), and ninja rebuilds from
# scratch a build another ninja version made (their build logs differ): runs outside the
# tests (the system's ninja) and test sessions then rebuilt in turn, ~50 s each time, with
# every worker of a run waiting on the build's lock. The tests keep their builds apart, one
# directory per environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(
    Path.home() / ".cache" / "torch_extensions" / f"tests-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}"))
# Every port a head node listens on is set, so two test sessions on one machine (set
# MAMBA_SLM_TEST_RAY_PORT / _DASHBOARD_PORT apart) do not collide, and teardown stops only
# the processes of this session's cluster, never `ray stop` (which stops every Ray here).
RAY_HEAD_PORT = int(os.environ.get("MAMBA_SLM_TEST_RAY_PORT", "6389"))
DASHBOARD_PORT = int(os.environ.get("MAMBA_SLM_TEST_DASHBOARD_PORT", "8265"))
CLIENT_PORT = 16390 - RAY_HEAD_PORT      # 10001 for the default head port (Ray's default); below the worker ports
AGENT_PORT = DASHBOARD_PORT + 44100       # 52365 for the default dashboard port, as Ray's default


def _ray_bin() -> str:
    """The `ray` CLI beside this interpreter, else the one on PATH (Ray installed into a
    --target directory, as on the GPU machines, has no script beside python)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or str(beside))


def _own_cluster_pids() -> set[int]:
    """The processes of the cluster on RAY_HEAD_PORT: each Ray process of a node names the
    GCS port in its command line (gcs_server_port=P, gcs-address=IP:P, --address=IP:P),
    and their children (workers, and the dashboard and runtime-env agents, whose process
    titles name no port)."""
    pattern = f"(:|port=){RAY_HEAD_PORT}( |$)"
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    pids, frontier = set(map(int, found)), list(map(int, found))
    while frontier:
        children = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True).stdout.split()
        for child in map(int, children):
            if child not in pids:
                pids.add(child)
                frontier.append(child)
    pids.discard(os.getpid())
    return pids


def _stop_own_cluster(grace_s: float = 3.0) -> None:
    """Stop the processes of the cluster on RAY_HEAD_PORT (`_own_cluster_pids`); nodes
    that tests join to this head are stopped too. SIGTERM, then SIGKILL after `grace_s`:
    workers, agents and the dashboard exit within ~1.5 s of SIGTERM, but the raylet takes
    ~10 s and the GCS and autoscaler monitor never exit on it (Ray 2.60), so a longer
    grace only delayed the end of every session."""
    import signal
    import time
    pids = _own_cluster_pids()

    def signal_all(sig) -> set[int]:
        alive = set()
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.add(pid)
            except ProcessLookupError:
                pass
        return alive

    pids = signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.5)
        pids = signal_all(0)
    signal_all(signal.SIGKILL)


def _wait_for_job_agent(dashboard: str, timeout_s: float = 90.0) -> None:
    """Right after `ray start`, job submission fails with "No available agent" until the
    dashboard's job agent is up; wait for it once here rather than retrying in tests.
    The probe is `ray job list`'s request, made here (the CLI costs a process start, ~3 s)."""
    import time

    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(dashboard).list_jobs()
            return
        except Exception:  # not up yet: connection refused, or an error status
            if time.monotonic() > deadline:
                return
        time.sleep(0.5)


def _start_head(dashboard: bool) -> subprocess.CompletedProcess:
    ports = ["--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
             f"--dashboard-agent-listen-port={AGENT_PORT}"] if dashboard else []
    # The GCS checks each node's raylet every 3 s and declares the node dead after 5 failed
    # checks; a killed raylet fails each at once (connection refused), so tests that kill a
    # node (test_elastic) waited 15 s for Ray to notice. Every 0.5 s: 2.5 s. A slow raylet
    # is given as long as before (the timeout of each check is unchanged).
    return subprocess.run(
        [_ray_bin(), "start", "--head", f"--port={RAY_HEAD_PORT}", "--num-cpus=4",
         f"--include-dashboard={str(dashboard).lower()}", *ports, f"--ray-client-server-port={CLIENT_PORT}",
         "--disable-usage-stats"],
        capture_output=True, text=True, env={**os.environ, "RAY_health_check_period_ms": "500"},
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """Start a head node (4 logical CPUs on 2 cores: Ray Data needs slack, FIELD-NOTES)
    and connect this process to it. Yields a dict with `address`, `dashboard` (None where
    the dashboard cannot start, e.g. Ray without its `default` extras on the GPU machines:
    the cluster then starts without it and `ray job submit` tests skip) and `ray` (the CLI)."""
    import ray

    address = f"127.0.0.1:{RAY_HEAD_PORT}"
    _stop_own_cluster()  # leftovers of an earlier session on the same ports
    dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"
    started = _start_head(dashboard=True)
    if started.returncode != 0:
        _stop_own_cluster()
        print(f"`ray start --head` with the dashboard failed ({started.returncode}); starting without it:\n"
              f"{started.stderr[-2000:]}")
        dashboard, started = None, _start_head(dashboard=False)
    if started.returncode != 0:
        _stop_own_cluster()
        pytest.fail(f"`ray start --head` failed ({started.returncode}):\n{started.stdout[-3000:]}\n"
                    f"{started.stderr[-3000:]}", pytrace=False)
    if dashboard:
        _wait_for_job_agent(dashboard)
    os.environ["RAY_ADDRESS"] = address
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        yield {"address": address, "dashboard": dashboard, "ray": _ray_bin()}
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        _stop_own_cluster()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def clean_dir(tmp_path: Path) -> Path:
    """A fresh directory removed after the test (large checkpoints do not pile up)."""
    path = tmp_path / "work"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn_ranks():
    """run(target, world, *args, backend="gloo") -> {rank: target(rank, world, *args)}:
    `world` spawned processes in one process group (127.0.0.1, DeepSpeed's environment
    variables set; NCCL ranks on GPU `rank`). Results must be plain Python/numpy (a tensor
    in a queue is shared memory that goes with its process). Fails as soon as a rank dies
    without reporting."""
    return _spawn_ranks


def _rank_main(target, rank: int, world: int, port: int, backend: str, args: tuple, out) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out.put((rank, target(rank, world, *args)))
    finally:
        dist.destroy_process_group()


def _spawn_ranks(target, world: int, *args, backend: str = "gloo", timeout_s: float = 300.0) -> dict:
    import queue
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(target, rank, world, port, backend, args, out))
             for rank in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(results) < world:
            try:
                rank, value = out.get(timeout=2)
                results[rank] = value
            except queue.Empty:
                died = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode not in (None, 0)}
                if died:
                    pytest.fail(f"rank(s) exited before reporting (exit codes {died}); tracebacks above")
                if time.monotonic() > deadline:
                    pytest.fail(f"{world - len(results)} rank(s) did not report within {timeout_s:.0f} s")
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return results

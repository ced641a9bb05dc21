"""`jobs/launch.py`: dry-run files, and submission against kmock, a Kubernetes API
emulator on 127.0.0.1. kmock has no controller, so the test plays KubeRay's part: it
patches the RayJob status and creates the submitter pod whose log the launcher follows."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import kmock
import pytest
import yaml
from kmock._internal.apps import Server
from kubernetes import client

from mamba_slm.cluster.security import security_violations

NAME, NS = "pretrain-test", "default"
SUBMITTER_POD = f"{NAME}-x7k2p"
LOG_LINES = ["step 1 loss 10.8", "step 2 loss 9.9", "checkpoint saved step 2"]
FLAGS = ["--name", NAME, "--image", "registry.example/mamba-slm:0.1.0", "--storage-path",
         "s3://bucket/runs", "--size", "tiny", "--training-config", "quick_test", "--gpus", "2",
         "--gpus-per-node", "1", "--min-gpus", "1", "--max-steps", "2", "--volume", "curated:/data"]


class Emulator:
    """kmock's KubernetesEmulator served on 127.0.0.1 from a background event loop."""

    def __init__(self):
        self._ready, self._loop = threading.Event(), asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),),
                                        daemon=True)
        self._thread.start()
        assert self._ready.wait(20), "kmock did not start"

    async def _serve(self):
        async with kmock.KubernetesEmulator() as k8s, Server(k8s) as server:
            for resource in ("v1/pods", "v1/secrets", "ray.io/v1/rayjobs", "ray.io/v1/rayclusters"):
                k8s.resources[resource] = {}
            k8s[f"get /api/v1/namespaces/{NS}/pods/{SUBMITTER_POD}/log"] << "\n".join(LOG_LINES).encode()
            self.k8s, self.url, self._stop = k8s, str(server.url).rstrip("/"), asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def close(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def kube(tmp_path):
    emulator = Emulator()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": emulator.url}}],
        "users": [{"name": "u", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}]}))
    configuration = client.Configuration()
    configuration.host = emulator.url
    yield emulator, str(kubeconfig), client.ApiClient(configuration)
    emulator.close()


def play_kuberay(api: client.ApiClient, final_job_status: str, final_deployment: str):
    """What the KubeRay operator would do, through the same API: status transitions
    and the submitter pod."""
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    for _ in range(200):
        try:
            custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", NAME)
            break
        except client.ApiException:
            time.sleep(0.05)
    else:
        raise AssertionError("the launcher never created the RayJob")

    def status(deployment, job):
        custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", NS, "rayjobs", NAME,
            {"status": {"jobDeploymentStatus": deployment, "jobStatus": job}})
        time.sleep(0.3)

    status("Initializing", "")
    core.create_namespaced_pod(NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": SUBMITTER_POD, "namespace": NS,
        "labels": {"batch.kubernetes.io/job-name": NAME}},
        "spec": {"containers": [{"name": "submitter", "image": "x"}]}})
    status("Running", "RUNNING")
    status(final_deployment, final_job_status)


def run_launch(kubeconfig, capsys, *extra):
    sys.path.insert(0, "jobs")
    try:
        import launch
    finally:
        sys.path.remove("jobs")
    code = launch.main(FLAGS + ["--kubeconfig", kubeconfig, "--poll-s", "0.1", "--timeout-s", "30", *extra])
    return code, capsys.readouterr()


@pytest.mark.parametrize("final", [("SUCCEEDED", "Complete", 0), ("FAILED", "Failed", 1)])
def test_launch_applies_rayjob_watches_status_and_prints_logs(kube, capsys, repo_root, monkeypatch, final):
    monkeypatch.chdir(repo_root)
    emulator, kubeconfig, api = kube
    controller = threading.Thread(target=play_kuberay, args=(api, final[0], final[1]))
    controller.start()
    code, out = run_launch(kubeconfig, capsys)
    controller.join(10)
    assert code == final[2], out.err

    created = client.CustomObjectsApi(api).get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", NAME)
    assert created["kind"] == "RayJob" and security_violations(created) == []
    assert "--size tiny" in created["spec"]["entrypoint"] and "--max-steps 2" in created["spec"]["entrypoint"]
    secret = client.CoreV1Api(api).read_namespaced_secret(f"{NAME}-ray-auth", NS)
    token = (secret.string_data or secret.data or {})["auth_token"]
    assert len(token) >= 32 and token not in out.out  # the token never reaches the console

    lines = out.out.splitlines()
    for line in LOG_LINES:
        assert line in lines
    transitions = [line for line in lines if line.startswith(f"[rayjob {NAME}] deployment=")]
    assert transitions[0].endswith("deployment=- job=-") or "Initializing" in transitions[0]
    assert any("deployment=Running job=RUNNING" in line for line in transitions)
    assert f"finished: deployment={final[1]} job={final[0]}" in out.out


def test_launch_refuses_to_overwrite_an_existing_job(kube, capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    _, kubeconfig, _ = kube
    assert run_launch(kubeconfig, capsys, "--no-watch")[0] == 0
    code, out = run_launch(kubeconfig, capsys, "--no-watch")
    assert code == 2 and "exists already" in out.err


def test_dry_run_writes_valid_manifests_and_bad_args_exit_2(tmp_path, repo_root, validate_manifest):
    for kind in ("rayjob", "raycluster"):
        done = subprocess.run([sys.executable, "jobs/launch.py", *FLAGS, "--kind", kind, "--dry-run",
                               "--out-dir", str(tmp_path)], cwd=repo_root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        manifest = yaml.safe_load((tmp_path / f"{NAME}-{kind}.yaml").read_text())
        assert manifest["kind"].lower() == kind
        assert validate_manifest(manifest) == [] and security_violations(manifest) == []
    bad = subprocess.run([sys.executable, "jobs/launch.py", *FLAGS, "--gpus", "3", "--gpus-per-node", "2",
                          "--dry-run", "--out-dir", str(tmp_path)], cwd=repo_root, capture_output=True, text=True)
    assert bad.returncode == 2 and "gpus=3 must be a positive multiple of gpus_per_node=2" in bad.stderr
    assert "Traceback" not in bad.stderr
    for extra, needle in ((["--poll-s", "-1"], "--poll-s -1.0: give a positive interval"),
                          (["--node-selector", "bad key=x"], "Kubernetes label key"),
                          (["--out-dir", "/proc/nope"], "launch.py: error:"),
                          (["--volume", ""], "CLAIM:/mount")):
        bad = subprocess.run([sys.executable, "jobs/launch.py", *FLAGS, "--dry-run", "--out-dir", str(tmp_path),
                              *extra], cwd=repo_root, capture_output=True, text=True)
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr, (extra, bad.stderr)


def test_unreachable_api_server_exits_2_without_a_traceback(tmp_path, repo_root):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    done = subprocess.run([sys.executable, "jobs/launch.py", *FLAGS, "--kubeconfig", str(kubeconfig)],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Kubernetes API" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_watch_timeout_exits_1_and_says_the_job_keeps_running(monkeypatch, capsys):
    """TimeoutError is an OSError: the --timeout-s expiry must not be reported as a bad argument."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_job", Path(__file__).parents[2] / "jobs" / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)

    class Kube:
        def __init__(self, api):
            pass

        def ensure_auth_secret(self, namespace, name):
            return False

        def create(self, manifest):
            pass

    def watch(*args, **kwargs):
        raise TimeoutError("RayJob default/x still Running after 1 s; it keeps running in the cluster")

    monkeypatch.setattr(launch, "missing_extra", lambda *a, **k: "")
    monkeypatch.setattr(launch, "api_client", lambda *a: None)
    monkeypatch.setattr(launch, "KubeRayClient", Kube)
    monkeypatch.setattr(launch, "watch_job", watch)
    assert launch.main([*FLAGS, "--timeout-s", "1"]) == 1
    err = capsys.readouterr().err
    assert "keeps running" in err and "error" not in err

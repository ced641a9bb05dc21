"""Apply rendered manifests through the Kubernetes API, watch a RayJob, print its logs.

Uses the `kubernetes` client: RayJob/RayCluster are custom objects (`CustomObjectsApi`),
the Ray token Secret and the submitter pod's logs go through `CoreV1Api`. The RayJob's
submitter pod (a Kubernetes Job that KubeRay names after the RayJob) runs
`ray job submit`, which tails the driver's output; following its log is following the
training log.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
try:
    from kubernetes import client
    from urllib3.exceptions import HTTPError

    # What the API calls raise: an answer that is an error, or no answer (server unreachable).
    API_ERRORS: tuple[type[Exception], ...] = (client.ApiException, HTTPError)
except ImportError:  # the [cluster] extra: rendering and --dry-run do without it (jobs/launch.py)
    client, API_ERRORS = None, ()

from mamba_slm.cluster.security import security_violations

GROUP, VERSION = "ray.io", "v1"
PLURALS = {"RayJob": "rayjobs", "RayCluster": "rayclusters"}
# KubeRay's RayJob `status.jobDeploymentStatus` values after which nothing more happens.
TERMINAL_DEPLOYMENT = {"Complete", "Failed", "ValidationFailed"}
# Labels that Kubernetes puts on a Job's pods (new and legacy spelling).
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")


class LaunchError(RuntimeError):
    """A problem the user fixes (exists already, insecure manifest, API refused)."""


@dataclass(frozen=True)
class JobState:
    deployment: str   # status.jobDeploymentStatus: Initializing, Running, Complete, Failed, ...
    job: str          # status.jobStatus: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str

    @property
    def finished(self) -> bool:
        return self.deployment in TERMINAL_DEPLOYMENT

    @property
    def succeeded(self) -> bool:
        return self.deployment == "Complete" and self.job == "SUCCEEDED"


def check_manifest(manifest: dict[str, Any]) -> None:
    problems = security_violations(manifest)
    if problems:
        raise LaunchError("refusing an insecure manifest:\n  " + "\n  ".join(problems))


def write_manifests(manifests: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """--dry-run: write each manifest as `<name>-<kind>.yaml` (checked first)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for manifest in manifests:
        check_manifest(manifest)
        path = out_dir / f"{manifest['metadata']['name']}-{manifest['kind'].lower()}.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        paths.append(path)
    return paths


class KubeRayClient:
    """The few API calls a launch needs, on one `kubernetes.client.ApiClient`."""

    def __init__(self, api_client: client.ApiClient):
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def ensure_auth_secret(self, namespace: str, name: str) -> bool:
        """Create the Secret with a random Ray token unless it exists; True if created.
        The token never leaves the cluster: read it with `kubectl get secret`."""
        try:
            self.core.read_namespaced_secret(name, namespace)
            return False
        except client.ApiException as exc:
            if exc.status != 404:
                raise LaunchError(f"reading Secret {namespace}/{name}: {exc.reason}") from exc
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/name": "mamba-slm"}},
                "stringData": {"auth_token": secrets.token_urlsafe(32)}}
        self.core.create_namespaced_secret(namespace, body)
        return True

    def create(self, manifest: dict[str, Any]) -> None:
        check_manifest(manifest)
        meta = manifest["metadata"]
        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], PLURALS[manifest["kind"]], manifest)
        except client.ApiException as exc:
            if exc.status == 409:
                raise LaunchError(f"{manifest['kind']} {meta['namespace']}/{meta['name']} exists "
                                  "already: delete it (kubectl delete) or pick another --name") from exc
            raise LaunchError(f"creating {manifest['kind']} {meta['name']}: {exc.status} {exc.reason}") from exc

    def job_state(self, namespace: str, name: str) -> JobState:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "rayjobs", name)
        status = obj.get("status") or {}
        return JobState(status.get("jobDeploymentStatus", ""), status.get("jobStatus", ""),
                        status.get("message", ""))

    def submitter_pods(self, namespace: str, job_name: str) -> list[str]:
        pods = []
        for label in JOB_NAME_LABELS:
            listed = self.core.list_namespaced_pod(namespace, label_selector=f"{label}={job_name}")
            # Filter again client-side: the selector is the server's job, but cheap to verify.
            pods += [p.metadata.name for p in listed.items
                     if (p.metadata.labels or {}).get(label) == job_name]
        return sorted(set(pods))

    def follow_log(self, namespace: str, pod: str, emit: Callable[[str], None],
                   stop: threading.Event, retry_s: float) -> None:
        """Stream a pod's log until it ends; retry while the container is not started."""
        while not stop.is_set():
            try:
                response = self.core.read_namespaced_pod_log(
                    pod, namespace, follow=True, _preload_content=False)
            except client.ApiException as exc:
                if exc.status in (400, 404):  # waiting for the container, or not yet listed
                    stop.wait(retry_s)
                    continue
                raise
            pending = b""
            for chunk in response.stream():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    emit(line.decode(errors="replace"))
            if pending:
                emit(pending.decode(errors="replace"))
            return


def watch_job(kube: KubeRayClient, namespace: str, name: str, emit: Callable[[str], None] = print,
              poll_s: float = 10.0, timeout_s: float | None = None) -> JobState:
    """Print state changes and the submitter's log until the RayJob finishes.

    Returns the final state; raises TimeoutError after `timeout_s` (the job keeps
    running in the cluster).
    """
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            emit(line)

    stop, followers = threading.Event(), {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    try:
        while True:
            state = kube.job_state(namespace, name)
            if last is None or (state.deployment, state.job) != (last.deployment, last.job):
                say(f"[rayjob {name}] deployment={state.deployment or '-'} job={state.job or '-'}"
                    + (f" ({state.message})" if state.message else ""))
            last = state
            for pod in kube.submitter_pods(namespace, name):
                if pod not in followers:
                    followers[pod] = threading.Thread(
                        target=kube.follow_log, args=(namespace, pod, say, stop, poll_s),
                        name=f"log-{pod}", daemon=True)
                    followers[pod].start()
            if state.finished:
                for thread in followers.values():
                    thread.join(timeout=max(poll_s, 5.0))
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"RayJob {namespace}/{name} still {state.deployment or 'pending'} "
                                   f"after {timeout_s:.0f} s; it keeps running in the cluster")
            time.sleep(poll_s)
    finally:
        stop.set()

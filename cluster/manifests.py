"""Render KubeRay `ray.io/v1` RayCluster and RayJob manifests from a `RunSpec`.

Shape of the cluster (issue 7):
- head: on-demand capacity, no GPU, `num-cpus: 0` so no work lands on it; the Ray
  dashboard sits behind a ClusterIP service (reachable only inside the cluster).
- `cpu` worker group: autoscales from 0 for Ray Data curation and preprocessing.
- `gpu` worker group: spot capacity on AWS, GCP or Azure (node affinity over each cloud's
  spot label, tolerations for their spot taints); `minReplicas`/`maxReplicas` are the
  trainer's elastic range in nodes.
- Ray token authentication (`authOptions.mode: token`) with the token in a Secret, so the
  dashboard and job submission need the token. Secrets reach pods only by reference.
- Optional GCS fault tolerance on an external Redis (`gcsFaultToleranceOptions`).

Manifests are plain dicts (what `CustomObjectsApi` takes and `yaml.safe_dump` writes).
"""
from __future__ import annotations

import shlex
from typing import Any

import yaml

from mamba_slm.cluster.spec import (GPU_NODE_TYPES, INSTANCE_TYPE_LABEL, PROJECT_DIR, RAY_VERSION,
                                    SPOT_TARGETS, RunSpec, clouds_for)

API_VERSION = "ray.io/v1"
HEAD_CONTAINER, WORKER_CONTAINER, SUBMITTER_CONTAINER = "ray-head", "ray-worker", "submitter"
# Runtime-env working_dir excludes: data and run outputs never ride along with the code.
WORKING_DIR_EXCLUDES = [".git", ".venv", "data", "runs", "outputs", "wandb", "*.parquet",
                        "*.safetensors", "*.pt", "*.bin"]


def pretrain_entrypoint(spec: RunSpec) -> str:
    """The shell command the RayJob runs (the same one `ray job submit` takes)."""
    args = ["python", "jobs/pretrain.py",
            "--name", spec.name,  # the run (its checkpoints) is this job's, not any run of the preset
            "--size", spec.size,
            "--training-config", spec.training_config,
            "--output-dir", spec.output_dir,
            "--data-path", spec.data_path,
            "--storage-path", spec.storage_path,
            "--zero-stage", str(spec.zero_stage),
            "--use-gpu",
            "--num-workers", str(spec.gpus),
            "--min-workers", str(spec.elastic_min_gpus),
            "--max-failures", str(spec.max_failures)]
    if spec.spot:
        # The clouds' metadata notices (AWS two minutes ahead, GCP ~30 s) reach the trainer
        # whether or not the pod's SIGTERM reaches the Ray worker processes (it goes to the
        # container's first process); on another cloud those polls just find nothing.
        clouds = [c for c in clouds_for(spec.cloud) if c in ("aws", "gcp")]
        args += ["--preemption-notices", ",".join(["sigterm", *clouds])]
    if spec.max_steps is not None:
        args += ["--max-steps", str(spec.max_steps)]
    return shlex.join(args)


def runtime_env(spec: RunSpec) -> dict[str, Any]:
    """Ray runtime environment: the project directory of the image as working_dir (the
    submitter uploads it, as `ray job submit --working-dir .` does) and non-secret env."""
    return {
        "working_dir": PROJECT_DIR,
        "excludes": WORKING_DIR_EXCLUDES,
        "env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                     "RAY_USAGE_STATS_ENABLED": "0"},
    }


def render_rayjob(spec: RunSpec) -> dict[str, Any]:
    """A RayJob that creates its own RayCluster, runs pretraining, and tears down."""
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(spec),
        "spec": {
            "entrypoint": pretrain_entrypoint(spec),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env(spec), sort_keys=False),
            # Retries of the whole job on a fresh cluster (a failed driver, or a run stopped
            # by a preemption notice: jobs/pretrain.py exits 75 then); the trainer resumes
            # from the latest checkpoint in storage_path, so a retry loses at most one interval.
            "backoffLimit": spec.backoff_limit,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": _submitter_template(spec),
            "rayClusterSpec": raycluster_spec(spec),
        },
    }


def render_raycluster(spec: RunSpec) -> dict[str, Any]:
    """A long-lived RayCluster of the same shape, for `ray job submit` by hand."""
    return {"apiVersion": API_VERSION, "kind": "RayCluster",
            "metadata": _metadata(spec), "spec": raycluster_spec(spec)}


def raycluster_spec(spec: RunSpec) -> dict[str, Any]:
    min_nodes, max_nodes = spec.gpu_replicas
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "resources": _resources("500m", "1Gi"),
            "securityContext": _container_security(),
        },
        "authOptions": {"mode": "token", "secretName": spec.ray_auth_secret},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "enableIngress": False,
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod_template(spec, HEAD_CONTAINER, _resources(str(spec.head_cpus), spec.head_memory),
                                      affinity=_on_demand_affinity(spec), service_account_token=True),
        },
        "workerGroupSpecs": [
            {
                "groupName": "cpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": spec.cpu_workers_max,
                "rayStartParams": {},
                "template": _pod_template(spec, WORKER_CONTAINER,
                                          _resources(str(spec.cpu_worker_cpus), spec.cpu_worker_memory)),
            },
            {
                "groupName": "gpu",
                # Start at full size; the autoscaler and the elastic trainer cope when spot
                # capacity is short (training runs on >= minReplicas nodes).
                "replicas": max_nodes,
                "minReplicas": min_nodes,
                "maxReplicas": max_nodes,
                "rayStartParams": {"num-gpus": str(spec.gpus_per_node)},
                "template": _gpu_template(spec),
            },
        ],
    }
    if spec.redis_address:
        cluster["gcsFaultToleranceOptions"] = _gcs_fault_tolerance(spec)
    return cluster


def _metadata(spec: RunSpec) -> dict[str, Any]:
    return {"name": spec.name, "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/name": "mamba-slm",
                       "app.kubernetes.io/instance": spec.name,
                       "mamba-slm/size": spec.size}}


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    """Requests equal limits: Guaranteed QoS, so the kubelet evicts these pods last."""
    amounts = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _container_security() -> dict[str, Any]:
    return {"privileged": False, "allowPrivilegeEscalation": False, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _secret_env(spec: RunSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(env, envFrom) entries that bring secrets in, by reference only."""
    env, env_from = [], []
    if spec.wandb_secret:
        env.append({"name": "WANDB_API_KEY", "valueFrom": {
            "secretKeyRef": {"name": spec.wandb_secret, "key": "WANDB_API_KEY"}}})
    if spec.storage_secret:
        env_from.append({"secretRef": {"name": spec.storage_secret}})
    return env, env_from


def _pod_template(spec: RunSpec, container_name: str, resources: dict[str, Any], *,
                  affinity: dict[str, Any] | None = None, tolerations: list | None = None,
                  node_selector: dict[str, str] | None = None,
                  service_account_token: bool = False) -> dict[str, Any]:
    env, env_from = _secret_env(spec)
    container: dict[str, Any] = {
        "name": container_name,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": resources,
        "securityContext": _container_security(),
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}] + env,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    if spec.volume_claim:  # curated data (and checkpoints, if storage_path is under it) for every pod
        claim, mount = spec.volume_claim
        container["volumeMounts"].append({"name": "shared", "mountPath": mount})
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": claim}})
    if container_name == HEAD_CONTAINER:
        container["ports"] = [{"containerPort": 6379, "name": "gcs-server"},
                              {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}]
    if env_from:
        container["envFrom"] = env_from
    pod: dict[str, Any] = {
        "containers": [container],
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        # The head's autoscaler talks to the Kubernetes API; workers never need a token.
        "automountServiceAccountToken": service_account_token,
        # Time between SIGTERM (spot reclaim notice, node drain) and SIGKILL: the window
        # in which the trainer writes its preemption checkpoint.
        "terminationGracePeriodSeconds": spec.termination_grace_s,
        "volumes": volumes,
    }
    if affinity:
        pod["affinity"] = affinity
    if tolerations:
        pod["tolerations"] = tolerations
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    return {"metadata": {"labels": {"app.kubernetes.io/name": "mamba-slm",
                                    "app.kubernetes.io/instance": spec.name}},
            "spec": pod}


def _gpu_template(spec: RunSpec) -> dict[str, Any]:
    resources = _resources(str(spec.cpus_per_gpu * spec.gpus_per_node),
                           _scale_quantity(spec.memory_per_gpu, spec.gpus_per_node),
                           gpus=spec.gpus_per_node)
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if spec.spot:
        affinity = _spot_affinity(spec)
        for cloud in clouds_for(spec.cloud):
            for target in SPOT_TARGETS[cloud]:
                if target.taint_key:
                    tolerations.append({"key": target.taint_key, "operator": "Equal",
                                        "value": target.taint_value, "effect": "NoSchedule"})
    else:
        affinity = _on_demand_affinity(spec, instance_types=True)
    return _pod_template(spec, WORKER_CONTAINER, resources, affinity=affinity,
                         tolerations=tolerations, node_selector=spec.node_selector)


def _instance_type_terms(spec: RunSpec, cloud: str) -> list[dict[str, Any]]:
    """Pin 8-GPU pods to the cloud's 8-GPU instance type of the requested GPU."""
    if spec.gpus_per_node != 8 or spec.node_selector:
        return []
    return [{"key": INSTANCE_TYPE_LABEL, "operator": "In",
             "values": [GPU_NODE_TYPES[spec.gpu_type][cloud]]}]


def _spot_affinity(spec: RunSpec) -> dict[str, Any]:
    """One node-selector term per (cloud, spot label); Kubernetes ORs the terms, so the
    same manifest lands on spot nodes of whichever cloud the cluster runs on."""
    terms = [{"matchExpressions": [{"key": t.label, "operator": "In", "values": [t.value]}]
              + _instance_type_terms(spec, cloud)}
             for cloud in clouds_for(spec.cloud) for t in SPOT_TARGETS[cloud]]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def _on_demand_affinity(spec: RunSpec, instance_types: bool = False) -> dict[str, Any]:
    """Keep off spot nodes: NotIn also matches nodes without the label, so one term
    excludes every cloud's spot nodes at once."""
    expressions = [{"key": t.label, "operator": "NotIn", "values": [t.value]}
                   for cloud in clouds_for(spec.cloud) for t in SPOT_TARGETS[cloud]]
    if instance_types and spec.gpus_per_node == 8 and not spec.node_selector:
        expressions.append({"key": INSTANCE_TYPE_LABEL, "operator": "In",
                            "values": [GPU_NODE_TYPES[spec.gpu_type][c] for c in clouds_for(spec.cloud)]})
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": expressions}]}}}


def _submitter_template(spec: RunSpec) -> dict[str, Any]:
    """The pod that runs `ray job submit`. KubeRay fills in the command when it is
    absent; the token comes from the same Secret as the cluster's."""
    container = {
        "name": SUBMITTER_CONTAINER,
        "image": spec.image,
        "resources": _resources("1", "2Gi"),
        "securityContext": _container_security(),
        "env": [{"name": "RAY_AUTH_MODE", "value": "token"},
                {"name": "RAY_AUTH_TOKEN", "valueFrom": {
                    "secretKeyRef": {"name": spec.ray_auth_secret, "key": "auth_token"}}}],
    }
    return {"spec": {"restartPolicy": "Never", "containers": [container],
                     "automountServiceAccountToken": False,
                     "securityContext": {"runAsNonRoot": True,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "affinity": _on_demand_affinity(spec)}}


def _gcs_fault_tolerance(spec: RunSpec) -> dict[str, Any]:
    options: dict[str, Any] = {"redisAddress": spec.redis_address}
    if spec.redis_password_secret:
        name, key = spec.redis_password_secret.split(":")
        options["redisPassword"] = {"valueFrom": {"secretKeyRef": {"name": name, "key": key}}}
    return options


def _scale_quantity(quantity: str, factor: int) -> str:
    """'100Gi' * 8 -> '800Gi' (integer quantities with a binary or decimal suffix)."""
    digits = quantity.rstrip("KMGTPEikmgtpe")
    suffix = quantity[len(digits):]
    value = float(digits) * factor
    return f"{int(value) if value.is_integer() else value}{suffix}"

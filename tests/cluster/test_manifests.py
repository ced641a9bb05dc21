"""Rendered RayCluster/RayJob manifests: schema-valid, shaped as issue 7 asks, secure."""
from __future__ import annotations

import copy
import itertools
import re
import shlex

import pytest
import yaml

from mamba_slm.cluster.manifests import pretrain_entrypoint, render_raycluster, render_rayjob
from mamba_slm.cluster.security import pod_templates, security_violations
from mamba_slm.cluster.spec import RunSpec

BASE = dict(name="pretrain-6p7b", image="registry.example/mamba-slm:0.1.0",
            storage_path="s3://bucket/runs", volume="curated:/data", size="6.7B",
            training_config="medium_scale", gpus=16, gpus_per_node=8, min_gpus=8)
VARIANTS = {
    "spot-any": {},
    "spot-aws-wandb-storage": dict(cloud="aws", wandb_secret="wandb", storage_secret="s3-creds"),
    "spot-gcp-redis": dict(cloud="gcp", redis_address="redis.ray.svc:6379",
                           redis_password_secret="redis:password"),
    "spot-azure-4gpu": dict(cloud="azure", gpus=8, gpus_per_node=4, min_gpus=4, gpu_type="H100-80GB"),
    "on-demand-steps": dict(spot=False, max_steps=100, zero_stage=2),
    "tiny-1gpu-selector": dict(size="tiny", training_config="quick_test", gpus=2, gpus_per_node=1,
                               min_gpus=1, node_selector={"pool": "gpu"}),
}
RENDERERS = {"RayJob": render_rayjob, "RayCluster": render_raycluster}
CASES = list(itertools.product(VARIANTS, RENDERERS))


def _manifest(variant: str, kind: str) -> dict:
    return RENDERERS[kind](RunSpec(**{**BASE, **VARIANTS[variant]}))


@pytest.mark.parametrize("variant,kind", CASES)
def test_every_manifest_validates_against_kuberay_v1_7_crd_and_pod_schema(variant, kind, validate_manifest):
    assert validate_manifest(_manifest(variant, kind)) == []


@pytest.mark.parametrize("variant,kind", CASES)
def test_every_manifest_passes_every_security_rule(variant, kind):
    manifest = _manifest(variant, kind)
    assert security_violations(manifest) == []
    cluster = manifest["spec"]["rayClusterSpec"] if kind == "RayJob" else manifest["spec"]
    # The rules, checked here directly as well as through the checker:
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not cluster["headGroupSpec"]["enableIngress"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "pretrain-6p7b-ray-auth"}
    for _, template in pod_templates(manifest):
        pod = template["spec"]
        assert all("hostPath" not in v for v in pod.get("volumes", []))
        for container in pod["containers"]:
            assert container["securityContext"]["privileged"] is False
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            for kind_ in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind_])
            for env in container.get("env", []):
                assert "value" not in env or not any(
                    word in env["name"] for word in ("KEY", "TOKEN", "PASSWORD", "SECRET")
                ) or env["name"] == "RAY_AUTH_MODE"
    text = yaml.safe_dump(manifest)
    assert "LoadBalancer" not in text and "NodePort" not in text


@pytest.mark.parametrize("mutation,expected", [
    (lambda c, p: p["containers"][0]["securityContext"].update(privileged=True), "privileged container"),
    (lambda c, p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    (lambda c, p: p["containers"][0]["resources"].pop("limits"), "no cpu in resources.limits"),
    (lambda c, p: p["containers"][0]["env"].append({"name": "WANDB_API_KEY", "value": "abc"}),
     "WANDB_API_KEY is not from a secretKeyRef"),
    (lambda c, p: c["headGroupSpec"].update(serviceType="LoadBalancer"), "serviceType is LoadBalancer"),
    (lambda c, p: c["headGroupSpec"].update(enableIngress=True), "enableIngress"),
    (lambda c, p: c.update(authOptions={"mode": "disabled"}), "token authentication"),
    (lambda c, p: p.update(hostNetwork=True), "hostNetwork"),
])
def test_security_checker_catches_each_violation(mutation, expected):
    manifest = copy.deepcopy(_manifest("spot-aws-wandb-storage", "RayJob"))
    cluster = manifest["spec"]["rayClusterSpec"]
    mutation(cluster, cluster["workerGroupSpecs"][1]["template"]["spec"])
    problems = security_violations(manifest)
    assert any(expected in p for p in problems), problems


def test_schema_check_catches_a_misspelt_or_mistyped_field(validate_manifest):
    manifest = _manifest("spot-any", "RayJob")
    manifest["spec"]["shutdownAfterJobFinish"] = True          # typo: the API server would prune it
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["maxReplicas"] = "2"
    manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    errors = " | ".join(validate_manifest(manifest))
    assert "shutdownAfterJobFinish" in errors
    assert "maxReplicas" in errors
    assert "imagePullPolicy" in errors or "headGroupSpec.template" in errors


def test_rayjob_runs_pretrain_with_elastic_range_and_job_lifecycle():
    job = _manifest("spot-any", "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/pretrain.py"]
    # this job's own run (not any run of the preset), on the GPUs, surviving lost spot nodes
    assert "--use-gpu" in argv
    argv.remove("--use-gpu")
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags == {"--name": "pretrain-6p7b", "--size": "6.7B", "--training-config": "medium_scale",
                     "--output-dir": "/tmp/mamba-slm/output", "--data-path": "/data/curated",
                     "--storage-path": "s3://bucket/runs", "--zero-stage": "3",
                     "--num-workers": "16", "--min-workers": "8", "--max-failures": "20",
                     "--preemption-notices": "sigterm,aws,gcp"}  # spot on any cloud: its metadata notice too
    on_demand = shlex.split(pretrain_entrypoint(RunSpec(**{**BASE, "spot": False, "cloud": "azure"})))
    assert "--preemption-notices" not in on_demand
    assert job["backoffLimit"] > 0 and job["shutdownAfterJobFinishes"] is True
    assert 0 < job["ttlSecondsAfterFinished"] <= 300  # a finished cluster's GPU nodes do not idle an hour
    for group in [job["rayClusterSpec"]["headGroupSpec"], *job["rayClusterSpec"]["workerGroupSpecs"]]:
        pod = group["template"]["spec"]  # every pod sees the curated data on the shared claim
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "curated"}} in pod["volumes"]
        assert {"name": "shared", "mountPath": "/data"} in pod["containers"][0]["volumeMounts"]
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["working_dir"] == "/app" and "data" in env["excludes"]
    gpu = job["rayClusterSpec"]["workerGroupSpecs"][1]
    assert (gpu["groupName"], gpu["minReplicas"], gpu["maxReplicas"]) == ("gpu", 1, 2)
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8" and limits["memory"] == "800Gi"
    assert "--max-steps" in pretrain_entrypoint(RunSpec(**{**BASE, "max_steps": 5}))
    # GCP's 8 x A100-40GB node (a2-highgpu-8g) has 680 GiB: the pod must ask for less
    a100 = render_rayjob(RunSpec(**{**BASE, "gpu_type": "A100-40GB", "cloud": "gcp"}))
    gpu_pod = a100["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["requests"]["memory"] == "600Gi"


def test_head_on_demand_without_gpu_cpu_group_autoscales_from_zero():
    cluster = _manifest("spot-any", "RayCluster")["spec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    (term,) = head["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {(e["key"], e["operator"]) for e in term["matchExpressions"]} == {
        ("eks.amazonaws.com/capacityType", "NotIn"), ("karpenter.sh/capacity-type", "NotIn"),
        ("cloud.google.com/gke-spot", "NotIn"), ("kubernetes.azure.com/scalesetpriority", "NotIn")}
    cpu = cluster["workerGroupSpecs"][0]
    assert (cpu["groupName"], cpu["minReplicas"], cpu["replicas"], cpu["maxReplicas"]) == ("cpu", 0, 0, 4)
    assert cluster["enableInTreeAutoscaling"] is True


def _spot_terms(variant):
    pod = _manifest(variant, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return pod, [{(e["key"], e["operator"], tuple(e["values"])) for e in t["matchExpressions"]} for t in terms]


def test_gpu_group_targets_spot_on_each_cloud_with_its_label_and_toleration():
    pod, terms = _spot_terms("spot-any")
    spot_labels = {next(e for e in t if e[0] != "node.kubernetes.io/instance-type") for t in terms}
    assert spot_labels == {("eks.amazonaws.com/capacityType", "In", ("SPOT",)),
                           ("karpenter.sh/capacity-type", "In", ("spot",)),
                           ("cloud.google.com/gke-spot", "In", ("true",)),
                           ("kubernetes.azure.com/scalesetpriority", "In", ("spot",))}
    gcp = next(t for t in terms if ("cloud.google.com/gke-spot", "In", ("true",)) in t)
    assert ("node.kubernetes.io/instance-type", "In", ("a2-ultragpu-8g",)) in gcp
    tolerations = {(t["key"], t.get("value")) for t in pod["tolerations"]}
    assert {("cloud.google.com/gke-spot", "true"),
            ("kubernetes.azure.com/scalesetpriority", "spot"), ("nvidia.com/gpu", None)} <= tolerations

    pod, terms = _spot_terms("spot-azure-4gpu")  # one cloud; 4-GPU nodes: no instance pin
    assert terms == [{("kubernetes.azure.com/scalesetpriority", "In", ("spot",))}]

    pod, terms = _spot_terms("on-demand-steps")
    assert all(op == "NotIn" for key, op, _ in terms[0] if key != "node.kubernetes.io/instance-type")
    assert all("gke-spot" not in t["key"] for t in pod["tolerations"])

    pod, _ = _spot_terms("tiny-1gpu-selector")
    assert pod["nodeSelector"] == {"pool": "gpu"}


def test_secrets_are_referenced_and_gcs_fault_tolerance_uses_a_secret():
    cluster = _manifest("spot-aws-wandb-storage", "RayJob")["spec"]["rayClusterSpec"]
    container = cluster["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    assert {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "WANDB_API_KEY"}}} \
        in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert "gcsFaultToleranceOptions" not in cluster
    ft = _manifest("spot-gcp-redis", "RayCluster")["spec"]["gcsFaultToleranceOptions"]
    assert ft == {"redisAddress": "redis.ray.svc:6379",
                  "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis", "key": "password"}}}}


@pytest.mark.parametrize("change,field", [
    (dict(name="Bad_Name"), "name"), (dict(size="7B"), "size"), (dict(gpus=12), "gpus"),
    (dict(min_gpus=4), "min_gpus"), (dict(storage_path="bucket"), "storage_path"),
    (dict(gpu_type="V100"), "gpu_type"), (dict(redis_password_secret="x:y"), "redis_address"),
    (dict(zero_stage=1), "zero_stage"), (dict(memory_per_gpu="lots"), "memory_per_gpu"),
    # data and checkpoints must be where every pod sees them
    (dict(volume=None), "data_path='/data/curated' is in no pod unless it is on a shared volume"),
    (dict(data_path="s3://bucket/curated"), "reads curated shards from a directory"),
    (dict(storage_path="/ckpt"), "each pod's own disk"), (dict(volume="curated"), "CLAIM:/mount"),
    (dict(volume="c://"), "CLAIM:/mount"), (dict(volume="c:/app"), "would hide"),
    (dict(volume="c:/dev/shm"), "would hide"), (dict(data_path="data/curated"), "absolute path"),
    (dict(volume="c:/mnt"), "is not under the volume's mount /mnt"),
])
def test_bad_run_spec_names_the_field(change, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        RunSpec(**{**BASE, **change})
    # a path under the claim's mount, or data baked into the image, are seen by every pod
    RunSpec(**{**BASE, "storage_path": "/data/runs"})
    RunSpec(**{**BASE, "volume": None, "data_path": "/app/data/curated"})

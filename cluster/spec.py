"""The run description that KubeRay manifests are rendered from, and the cloud facts
it needs: GPU node shapes and the spot-capacity labels of the major clouds.

One `RunSpec` says what to train (size, training config, steps, data and storage) and
where (GPU type, GPU count, spot or on-demand, image). Everything is checked in
`__post_init__`, so a bad spec fails before anything is rendered or applied.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

RAY_VERSION = "2.60.0"
MODEL_SIZES = ("tiny", "1.3B", "2.7B", "6.7B", "13B")
TRAINING_CONFIGS = ("quick_test", "small_scale", "medium_scale", "large_scale")
CLOUDS = ("any", "aws", "gcp", "azure")
PROJECT_DIR = "/app"  # where cluster/Dockerfile puts the project in the image

# Well-known node label set by every cloud's node controller.
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"

# 8-GPU instance types per GPU model and cloud; used to pin GPU pods to the right nodes
# when a node carries 8 GPUs (other node shapes: pass --node-selector yourself).
# Sources: the providers' instance-type pages (AWS p4d/p4de/p5/p5e, GCP A2/A3, Azure ND).
GPU_NODE_TYPES: dict[str, dict[str, str]] = {
    "A100-40GB": {"aws": "p4d.24xlarge", "gcp": "a2-highgpu-8g", "azure": "Standard_ND96asr_v4"},
    "A100-80GB": {"aws": "p4de.24xlarge", "gcp": "a2-ultragpu-8g", "azure": "Standard_ND96amsr_A100_v4"},
    "H100-80GB": {"aws": "p5.48xlarge", "gcp": "a3-highgpu-8g", "azure": "Standard_ND96isr_H100_v5"},
    "H200-141GB": {"aws": "p5e.48xlarge", "gcp": "a3-ultragpu-8g", "azure": "Standard_ND96isr_H200_v5"},
}
GPU_TYPES = tuple(GPU_NODE_TYPES)
# Pod memory per GPU by default: 100Gi fits every 8-GPU type above (1.1+ TiB per node) except
# GCP's a2-highgpu-8g (A100-40GB: 680 GiB per node, 85 per GPU), where 800Gi would never schedule.
DEFAULT_MEMORY_PER_GPU = {"A100-40GB": "75Gi"}


@dataclass(frozen=True)
class SpotTarget:
    """How one cloud marks spot nodes: the label to select on, and the taint (if the
    cloud taints spot nodes) that pods must tolerate."""

    label: str
    value: str
    taint_key: str | None = None
    taint_value: str | None = None


# AWS: EKS managed node groups label `eks.amazonaws.com/capacityType`, Karpenter labels
# `karpenter.sh/capacity-type`; neither taints. GKE labels and taints spot nodes with
# `cloud.google.com/gke-spot=true:NoSchedule`; AKS with
# `kubernetes.azure.com/scalesetpriority=spot:NoSchedule`.
SPOT_TARGETS: dict[str, tuple[SpotTarget, ...]] = {
    "aws": (SpotTarget("eks.amazonaws.com/capacityType", "SPOT"),
            SpotTarget("karpenter.sh/capacity-type", "spot")),
    "gcp": (SpotTarget("cloud.google.com/gke-spot", "true",
                       "cloud.google.com/gke-spot", "true"),),
    "azure": (SpotTarget("kubernetes.azure.com/scalesetpriority", "spot",
                         "kubernetes.azure.com/scalesetpriority", "spot"),),
}

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_URI = re.compile(r"^([a-z][a-z0-9+.-]*://.+|/.+)$")
# Kubernetes label syntax (apimachinery validation.IsQualifiedName / IsValidLabelValue).
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def clouds_for(cloud: str) -> tuple[str, ...]:
    return tuple(c for c in CLOUDS if c != "any") if cloud == "any" else (cloud,)


@dataclass(frozen=True)
class RunSpec:
    """A training run on a KubeRay cluster.

    GPU counts are in GPUs (= Ray Train workers, one per GPU); pods carry
    `gpus_per_node` GPUs each, so the GPU worker group's replicas are GPU counts
    divided by `gpus_per_node`. `min_gpus` is the elastic floor of the trainer
    (`ScalingConfig(num_workers=(min_gpus, gpus))`) and the group's `minReplicas`.
    """

    name: str
    image: str
    storage_path: str
    volume: str | None = None            # "CLAIM:/mount": a ReadWriteMany PVC in every pod
    size: str = "1.3B"
    training_config: str = "small_scale"
    max_steps: int | None = None
    data_path: str = "/data/curated"
    output_dir: str = "/tmp/mamba-slm/output"
    zero_stage: int = 3
    namespace: str = "default"
    gpu_type: str = "A100-80GB"
    gpus: int = 8
    gpus_per_node: int = 8
    min_gpus: int | None = None          # default: one node
    spot: bool = True
    cloud: str = "any"
    node_selector: dict[str, str] = field(default_factory=dict)
    cpus_per_gpu: int = 10               # pod CPU per GPU (8-GPU nodes have 96+ vCPUs)
    memory_per_gpu: str = ""             # pod memory per GPU ("" = DEFAULT_MEMORY_PER_GPU, else 100Gi)
    shm_size: str = "64Gi"               # /dev/shm for NCCL and the Ray object store
    head_cpus: int = 8
    head_memory: str = "32Gi"
    cpu_workers_max: int = 4             # Ray Data workers, autoscaled from 0
    cpu_worker_cpus: int = 8
    cpu_worker_memory: str = "32Gi"
    wandb_secret: str | None = None      # Secret with key WANDB_API_KEY
    storage_secret: str | None = None    # Secret whose keys become env (AWS_*, ...)
    redis_address: str | None = None     # GCS fault tolerance: external Redis host:port
    redis_password_secret: str | None = None  # "secret-name:key"
    backoff_limit: int = 3
    max_failures: int = 20               # worker-group restarts within one job (lost spot nodes)
    ttl_seconds_after_finished: int = 300  # the finished cluster's lifetime (logs), GPU nodes included
    termination_grace_s: int = 120       # SIGTERM -> checkpoint window on preemption

    def __post_init__(self) -> None:
        if not (_DNS_LABEL.match(self.name) and len(self.name) <= 40):
            raise ValueError(f"name={self.name!r}: use lower-case letters, digits and '-', "
                             "starting with a letter, at most 40 characters (KubeRay appends suffixes)")
        if not _DNS_LABEL.match(self.namespace):
            raise ValueError(f"namespace={self.namespace!r} is not a valid Kubernetes namespace")
        _choice("size", self.size, MODEL_SIZES)
        _choice("training_config", self.training_config, TRAINING_CONFIGS)
        _choice("gpu_type", self.gpu_type, GPU_TYPES)
        _choice("cloud", self.cloud, CLOUDS)
        _choice("zero_stage", self.zero_stage, (2, 3))
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"image={self.image!r}: give a container image reference")
        if not _URI.match(self.storage_path):
            raise ValueError(f"storage_path={self.storage_path!r}: use a URI such as "
                             "s3://bucket/runs, gs://bucket/runs or an absolute path on shared storage")
        if self.volume_claim is not None:
            claim, mount = self.volume_claim
            if not _DNS_LABEL.match(claim) or not mount.startswith("/"):
                raise ValueError(f"volume={self.volume!r}: use CLAIM:/mount/path (a PersistentVolumeClaim "
                                 "name and where the pods mount it)")
            if mount in ("/dev/shm", "/tmp") or PROJECT_DIR.startswith(mount + "/") or mount == PROJECT_DIR:
                raise ValueError(f"volume={self.volume!r}: {mount} would hide what the pods need there "
                                 f"(the project in {PROJECT_DIR}, /dev/shm, the scratch in /tmp); mount it "
                                 "elsewhere, e.g. /data")
        if not self.data_path.startswith("/") and "://" not in self.data_path:
            raise ValueError(f"data_path={self.data_path!r}: give the absolute path the pods see")
        # The pods see a local path only in the image or on the shared volume: anything else
        # is each pod's own disk (data missing at start, checkpoints lost on a retry).
        if "://" in self.data_path:
            raise ValueError(f"data_path={self.data_path!r}: pretraining reads curated shards from a "
                             "directory; put them on a ReadWriteMany volume and pass volume=CLAIM:/mount "
                             "(--volume) with a data_path under the mount")
        if not self._shared(self.data_path, image_ok=True):
            if self.volume_claim:
                raise ValueError(f"data_path={self.data_path!r} is not under the volume's mount "
                                 f"{self.volume_claim[1]}: no pod would see it")
            raise ValueError(f"data_path={self.data_path!r} is in no pod unless it is on a shared volume: "
                             f"pass volume=CLAIM:{_parent(self.data_path)} (--volume; a ReadWriteMany "
                             "PersistentVolumeClaim holding the curated shards), or bake the data into "
                             f"the image under {PROJECT_DIR}")
        if "://" not in self.storage_path and not self._shared(self.storage_path):
            raise ValueError(f"storage_path={self.storage_path!r} would be each pod's own disk (checkpoints "
                             "lost when a pod goes): use a bucket URI (s3://, gs://) or a path under "
                             "the volume's mount (--volume CLAIM:/mount)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        if not 1 <= self.gpus_per_node <= 16:
            raise ValueError(f"gpus_per_node={self.gpus_per_node} must be in 1..16")
        if self.gpus < 1 or self.gpus % self.gpus_per_node:
            raise ValueError(f"gpus={self.gpus} must be a positive multiple of "
                             f"gpus_per_node={self.gpus_per_node}")
        if not self.gpus_per_node <= self.elastic_min_gpus <= self.gpus:
            raise ValueError(f"min_gpus={self.min_gpus} must be between gpus_per_node="
                             f"{self.gpus_per_node} and gpus={self.gpus}")
        if not self.memory_per_gpu:
            object.__setattr__(self, "memory_per_gpu", DEFAULT_MEMORY_PER_GPU.get(self.gpu_type, "100Gi"))
        for name in ("memory_per_gpu", "shm_size", "head_memory", "cpu_worker_memory"):
            if not _QUANTITY.match(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} is not a Kubernetes quantity (e.g. 64Gi)")
        for name in ("cpus_per_gpu", "head_cpus", "cpu_worker_cpus", "backoff_limit",
                     "ttl_seconds_after_finished", "termination_grace_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for key, value in self.node_selector.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise ValueError(f"node_selector {key}={value}: use a Kubernetes label key ([prefix/]name of "
                                 "letters, digits, '-', '_', '.') and value")
        if self.cpu_workers_max < 0 or self.max_failures < 0:
            raise ValueError(f"cpu_workers_max={self.cpu_workers_max} and max_failures={self.max_failures} "
                             "must be >= 0")
        for secret in (self.wandb_secret, self.storage_secret):
            if secret is not None and not _DNS_LABEL.match(secret):
                raise ValueError(f"secret name {secret!r} is not a valid Kubernetes name")
        if (self.redis_password_secret is not None) and self.redis_address is None:
            raise ValueError("redis_password_secret needs redis_address (GCS fault tolerance)")
        if self.redis_password_secret is not None and self.redis_password_secret.count(":") != 1:
            raise ValueError(f"redis_password_secret={self.redis_password_secret!r}: "
                             "use SECRET_NAME:KEY")

    @property
    def volume_claim(self) -> tuple[str, str] | None:
        """(PersistentVolumeClaim name, mount path) or None."""
        if self.volume is None:
            return None
        claim, _, mount = self.volume.partition(":")
        return claim, mount.rstrip("/")

    def _shared(self, path: str, image_ok: bool = False) -> bool:
        """Whether every pod sees `path`: under the volume's mount (or the image's project)."""
        roots = ([self.volume_claim[1]] if self.volume_claim else []) + ([PROJECT_DIR] if image_ok else [])
        return any(path == root or path.startswith(root + "/") for root in roots)

    @property
    def elastic_min_gpus(self) -> int:
        return self.gpus_per_node if self.min_gpus is None else self.min_gpus

    @property
    def gpu_replicas(self) -> tuple[int, int]:
        """(minReplicas, maxReplicas) of the GPU worker group."""
        return math.ceil(self.elastic_min_gpus / self.gpus_per_node), self.gpus // self.gpus_per_node

    @property
    def ray_auth_secret(self) -> str:
        """Secret (key `auth_token`) that holds the Ray token; `launch.py` creates it."""
        return f"{self.name}-ray-auth"


def _parent(path: str) -> str:
    """A mount to suggest for `path`: its parent folder, or the path itself at the root."""
    parent = path.rstrip("/").rsplit("/", 1)[0]
    return parent if parent else path.rstrip("/")


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; expected one of {', '.join(map(str, allowed))}")

"""Launch pretraining on Kubernetes with KubeRay.

Renders a RayJob (or a long-lived RayCluster) from the flags, checks it (security rules),
then either writes it to files (--dry-run) or applies it with the Kubernetes API, creates
the Ray token Secret if missing, watches the job and prints the training log.

  python jobs/launch.py --name pretrain-6p7b --size 6.7B --training-config medium_scale \\
      --gpu A100-80GB --gpus 16 --min-gpus 8 --image REGISTRY/mamba-slm:TAG \\
      --storage-path s3://BUCKET/runs --volume curated:/data --data-path /data/curated \\
      --dry-run --out-dir manifests/

Needs the KubeRay operator (v1.5.1+ for authOptions; manifests validated against v1.7.0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mamba_slm.cluster.manifests import render_raycluster, render_rayjob
from mamba_slm.cluster.spec import CLOUDS, GPU_TYPES, MODEL_SIZES, TRAINING_CONFIGS, RunSpec
from mamba_slm.cluster.submit import API_ERRORS, KubeRayClient, LaunchError, watch_job, write_manifests
from mamba_slm.platform.extras import missing_extra


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/launch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("what to train (flags of jobs/pretrain.py)")
    run.add_argument("--name", required=True, help="RayJob/RayCluster name (lower-case, digits, '-')")
    run.add_argument("--size", default="1.3B", choices=MODEL_SIZES)
    run.add_argument("--training-config", default="small_scale", choices=TRAINING_CONFIGS)
    run.add_argument("--max-steps", type=int, help="stop after N steps (default: the config's)")
    run.add_argument("--zero-stage", type=int, default=3, choices=(2, 3))
    run.add_argument("--data-path", default="/data/curated",
                     help="curated shards, as seen from the pods: under --volume's mount (or baked into "
                          "the image under /app)")
    run.add_argument("--volume", metavar="CLAIM:/MOUNT",
                     help="a ReadWriteMany PersistentVolumeClaim every pod mounts at MOUNT (the curated "
                          "data; checkpoints too if --storage-path is under it), e.g. curated:/data")
    run.add_argument("--output-dir", default="/tmp/mamba-slm/output", help="local scratch in the pods")
    run.add_argument("--storage-path", required=True,
                     help="checkpoints and results: s3://..., gs://..., or a path under --volume's mount")
    run.add_argument("--max-failures", type=int, default=20,
                     help="worker-group restarts within the job (a lost spot node costs one; default 20)")
    where = p.add_argument_group("where to run it")
    where.add_argument("--image", required=True, help="container image built from cluster/Dockerfile")
    where.add_argument("--namespace", default="default")
    where.add_argument("--gpu", default="A100-80GB", choices=GPU_TYPES, help="GPU model")
    where.add_argument("--gpus", type=int, default=8, help="GPUs (= training workers) at full size")
    where.add_argument("--gpus-per-node", type=int, default=8)
    where.add_argument("--min-gpus", type=int, help="elastic floor (default: one node)")
    capacity = where.add_mutually_exclusive_group()
    capacity.add_argument("--spot", dest="spot", action="store_true", default=True,
                          help="GPU workers on spot capacity (default)")
    capacity.add_argument("--on-demand", dest="spot", action="store_false")
    where.add_argument("--cloud", default="any", choices=CLOUDS,
                       help="whose spot labels to target (any: AWS, GCP and Azure at once)")
    where.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                       help="extra GPU node label to require (repeatable)")
    where.add_argument("--cpu-workers-max", type=int, default=4, help="Ray Data CPU workers, autoscaled")
    secrets = p.add_argument_group("secrets (by Secret name; values never pass through here)")
    secrets.add_argument("--wandb-secret", help="Secret with key WANDB_API_KEY")
    secrets.add_argument("--storage-secret", help="Secret whose keys become env (e.g. AWS_ACCESS_KEY_ID)")
    secrets.add_argument("--redis-address", help="external Redis host:port: turns on GCS fault tolerance")
    secrets.add_argument("--redis-password-secret", metavar="NAME:KEY")
    act = p.add_argument_group("what to do")
    act.add_argument("--kind", default="rayjob", choices=("rayjob", "raycluster"),
                     help="rayjob: run and tear down; raycluster: long-lived, for `ray job submit`")
    act.add_argument("--dry-run", action="store_true", help="write the manifests, apply nothing")
    act.add_argument("--out-dir", type=Path, default=Path("manifests"), help="--dry-run output folder")
    act.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    act.add_argument("--context", help="kubeconfig context")
    act.add_argument("--no-watch", action="store_true", help="apply and return at once")
    act.add_argument("--poll-s", type=float, default=10.0, help="status poll interval")
    act.add_argument("--ttl-after-finished-s", type=int, default=300,
                     help="seconds the finished RayJob's cluster stays up (logs) before KubeRay deletes it")
    act.add_argument("--timeout-s", type=float, help="stop watching after this long (job keeps running)")
    return p


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    selector = {}
    for item in args.node_selector:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--node-selector {item!r}: use KEY=VALUE")
        selector[key] = value
    if args.poll_s <= 0:
        raise ValueError(f"--poll-s {args.poll_s}: give a positive interval in seconds")
    return RunSpec(name=args.name, image=args.image, storage_path=args.storage_path, volume=args.volume,
                   max_failures=args.max_failures, ttl_seconds_after_finished=args.ttl_after_finished_s,
                   size=args.size,
                   training_config=args.training_config, max_steps=args.max_steps,
                   data_path=args.data_path, output_dir=args.output_dir, zero_stage=args.zero_stage,
                   namespace=args.namespace, gpu_type=args.gpu, gpus=args.gpus,
                   gpus_per_node=args.gpus_per_node, min_gpus=args.min_gpus, spot=args.spot,
                   cloud=args.cloud, node_selector=selector, cpu_workers_max=args.cpu_workers_max,
                   wandb_secret=args.wandb_secret, storage_secret=args.storage_secret,
                   redis_address=args.redis_address, redis_password_secret=args.redis_password_secret)


def api_client(kubeconfig: str | None, context: str | None):
    from kubernetes import config
    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, FileNotFoundError, TypeError) as exc:
        if kubeconfig is None and context is None:
            try:  # running inside a pod with a service account
                config.load_incluster_config()
                from kubernetes import client
                return client.ApiClient()
            except config.ConfigException:
                pass
        raise LaunchError(f"no usable Kubernetes config ({exc}); pass --kubeconfig/--context "
                          "or run `kubectl config current-context` to check") from exc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2 with the usage line
    manifest = render_rayjob(spec) if args.kind == "rayjob" else render_raycluster(spec)
    try:
        if args.dry_run:
            for path in write_manifests([manifest], args.out_dir):
                print(f"wrote {path}")
            print(f"before `kubectl apply -f`: create Secret {spec.ray_auth_secret} with key auth_token "
                  "(the Ray token), e.g. kubectl create secret generic "
                  f"{spec.ray_auth_secret} -n {spec.namespace} --from-literal=auth_token=$(openssl rand -hex 32)")
            return 0
        if msg := missing_extra("cluster", what="applying manifests (--dry-run writes them without it)"):
            raise LaunchError(msg)
        kube = KubeRayClient(api_client(args.kubeconfig, args.context))
        if kube.ensure_auth_secret(spec.namespace, spec.ray_auth_secret):
            print(f"created Secret {spec.namespace}/{spec.ray_auth_secret} (Ray token)")
        kube.create(manifest)
        print(f"created {manifest['kind']} {spec.namespace}/{spec.name}")
        if args.kind == "raycluster":
            print(f"submit with: kubectl port-forward -n {spec.namespace} svc/{spec.name}-head-svc 8265:8265 &"
                  f" RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<token from Secret {spec.ray_auth_secret}>"
                  " ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pretrain.py ...")
            return 0
        if args.no_watch:
            return 0
        state = watch_job(kube, spec.namespace, spec.name, poll_s=args.poll_s, timeout_s=args.timeout_s)
    except LaunchError as exc:
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return 2
    except API_ERRORS as exc:  # the API refused (e.g. no such --namespace) or did not answer
        detail = f"{exc.status} {exc.reason}" if hasattr(exc, "status") else str(exc)
        print(f"launch.py: error: Kubernetes API ({detail}); check --namespace, --context and "
              "`kubectl auth can-i create rayjobs`", file=sys.stderr)
        return 2
    except TimeoutError as exc:  # before OSError, its base class: the job keeps running
        print(f"launch.py: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # --out-dir not writable
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"[rayjob {spec.name}] finished: deployment={state.deployment} job={state.job}")
    return 0 if state.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())

"""Security checks on rendered RayCluster/RayJob manifests.

`launch.py` refuses to write or apply a manifest with any violation, and the tests run
the same checks on every manifest the renderer can produce. The rules (issue 7):
no privileged containers or privilege escalation, no host paths, host network or host
ports; requests and limits on every container; secrets only by reference; the dashboard
only on a ClusterIP service with no ingress; Ray token authentication on.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import yaml

# Env names that carry credentials: these must come from a Secret, never a literal.
# Matched per underscore-separated word: RAY_AUTH_TOKEN yes, TOKENIZERS_PARALLELISM no.
SECRET_ENV = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE)


def cluster_spec_of(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest.get("spec", {})
    return spec["rayClusterSpec"] if manifest.get("kind") == "RayJob" else spec


def pod_templates(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod template embedded in the manifest."""
    cluster = cluster_spec_of(manifest)
    yield "headGroupSpec.template", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"workerGroupSpecs[{group['groupName']}].template", group["template"]
    if manifest.get("kind") == "RayJob" and "submitterPodTemplate" in manifest["spec"]:
        yield "submitterPodTemplate", manifest["spec"]["submitterPodTemplate"]


def _containers(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in pod_templates(manifest):
        pod = template.get("spec", {})
        for kind in ("initContainers", "containers"):
            for container in pod.get(kind, []):
                yield f"{where}.{container.get('name')}", container
    autoscaler = cluster_spec_of(manifest).get("autoscalerOptions")
    if autoscaler is not None:
        yield "autoscalerOptions", autoscaler


def security_violations(manifest: dict[str, Any]) -> list[str]:
    """Every rule the manifest breaks, as readable lines (empty when it is clean)."""
    problems: list[str] = []
    for where, template in pod_templates(manifest):
        pod = template.get("spec", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{where}: {flag} is on")
        for volume in pod.get("volumes", []):
            if "hostPath" in volume:
                problems.append(f"{where}: volume {volume.get('name')} is a hostPath")
        if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
    for where, container in _containers(manifest):
        problems += _container_violations(where, container)
    problems += _cluster_violations(manifest)
    return problems


def _container_violations(where: str, container: dict[str, Any]) -> list[str]:
    problems = []
    context = container.get("securityContext", {})
    if context.get("privileged", False) is not False:
        problems.append(f"{where}: privileged container")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    added = context.get("capabilities", {}).get("add", [])
    if added:
        problems.append(f"{where}: adds capabilities {added}")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(kind, {}):
                problems.append(f"{where}: no {resource} in resources.{kind}")
    for port in container.get("ports", []):
        if "hostPort" in port:
            problems.append(f"{where}: hostPort {port['hostPort']}")
    for env in container.get("env", []):
        if SECRET_ENV.search(env["name"]) and env["name"] != "RAY_AUTH_MODE":
            if "secretKeyRef" not in env.get("valueFrom", {}):
                problems.append(f"{where}: env {env['name']} is not from a secretKeyRef")
    for source in container.get("envFrom", []):
        if "secretRef" not in source and "configMapRef" not in source:
            problems.append(f"{where}: envFrom entry {source} is neither a secretRef nor a configMapRef")
    return problems


def _cluster_violations(manifest: dict[str, Any]) -> list[str]:
    problems = []
    cluster = cluster_spec_of(manifest)
    head = cluster["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"headGroupSpec.serviceType is {head['serviceType']}: the dashboard "
                        "must stay inside the cluster (ClusterIP)")
    if head.get("enableIngress"):
        problems.append("headGroupSpec.enableIngress exposes the dashboard")
    if cluster.get("headServiceAnnotations", {}).get("service.beta.kubernetes.io/load-balancer"):
        problems.append("headServiceAnnotations ask for a load balancer")
    auth = cluster.get("authOptions", {})
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append("authOptions: Ray token authentication (mode: token, secretName) is off")
    password = cluster.get("gcsFaultToleranceOptions", {}).get("redisPassword")
    if password is not None and "secretKeyRef" not in password.get("valueFrom", {}):
        problems.append("gcsFaultToleranceOptions.redisPassword is not from a secretKeyRef")
    if manifest.get("kind") == "RayJob":
        env_vars = (yaml.safe_load(manifest["spec"].get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
        for name in env_vars:
            if SECRET_ENV.search(name):
                problems.append(f"runtimeEnvYAML env_vars.{name}: secrets must come from a Secret")
    return problems

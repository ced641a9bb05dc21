"""Offline validation of rendered manifests: the vendored KubeRay v1.7.0 CRD schemas
(tests/cluster/data/kuberay, Apache-2.0) and kubernetes-validate for pod templates."""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mamba_slm.cluster.security import pod_templates

KUBERAY_DIR = Path(__file__).parent / "data" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
KUBERNETES_VERSION = "1.30.0"


def _strict(schema):
    """Reject unknown fields, as `kubectl apply` (server-side strict field validation)
    does; a structural CRD schema alone would let a typo through and prune it."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((KUBERAY_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"]["additionalProperties"] = True
    return jsonschema.Draft7Validator(schema)


def crd_errors(manifest: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(manifest["kind"]).iter_errors(manifest)]


def pod_template_errors(manifest: dict) -> list[str]:
    errors = []
    for where, template in pod_templates(manifest):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": f"{manifest['metadata']['name']}-check"},
                   "template": copy.deepcopy(template)}
        try:
            kubernetes_validate.validate(wrapped, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {exc.message} at {list(exc.path)}")
    return errors


@pytest.fixture(scope="session")
def validate_manifest():
    def check(manifest: dict) -> list[str]:
        return crd_errors(manifest) + pod_template_errors(manifest)
    return check

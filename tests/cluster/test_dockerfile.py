"""The cluster image recipe agrees with the manifests and the issue (it cannot be built here)."""
import re

from mamba_slm.cluster.manifests import PROJECT_DIR
from mamba_slm.cluster.spec import RAY_VERSION


def test_dockerfile_builds_kernels_for_sm80_sm90_and_runs_non_root(repo_root):
    text = (repo_root / "cluster" / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-cudnn-devel-", text, re.M)  # nvcc for the kernels
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in text and 'FLASH_ATTN_CUDA_ARCHS="80;90"' in text
    for package in ("causal-conv1d==", "mamba-ssm==", "flash-attn==", "deepspeed==0.19.8"):
        assert f"--no-build-isolation {package}" in text
    assert f"WORKDIR {PROJECT_DIR}" in text  # the RayJob's runtime_env working_dir
    assert re.search(r"^USER 1000:1000$", text, re.M)  # numeric: runAsNonRoot can verify it
    pyproject = (repo_root / "pyproject.toml").read_text()
    assert f"ray[train,data,tune,default]=={RAY_VERSION}" in pyproject
    ignore = (repo_root / "cluster" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "data"} <= set(ignore)

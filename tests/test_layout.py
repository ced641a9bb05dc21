"""The package layout: one `mamba_slm` namespace, and the stdlib `platform` unshadowed."""
import subprocess
import sys


def test_stdlib_platform_and_mamba_slm_platform_from_repo_root(repo_root):
    code = (
        "import sys; sys.path.insert(0, '.');"
        "import platform; assert platform.system();"
        "import mamba_slm.platform, mamba_slm.model, mamba_slm.tune, mamba_slm.cluster;"
        "print(platform.system())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_no_top_level_platform_init(repo_root):
    assert not (repo_root / "platform" / "__init__.py").exists()


def test_every_package_folder_is_installed(repo_root):
    """A folder with an __init__.py that pyproject's package list misses imports from the
    repo (and an editable install) but is absent from a wheel: `pip install .` breaks."""
    import tomllib

    listed = set(tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    skip = {"tests", "jobs", "bench", ".venv", ".snap", ".whl", "build", "runs", "data"}
    found = {"mamba_slm." + ".".join(init.parent.relative_to(repo_root).parts)
             for init in repo_root.rglob("__init__.py")
             if init.parent != repo_root and init.relative_to(repo_root).parts[0] not in skip
             and not any(part.startswith(".") for part in init.relative_to(repo_root).parts)}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"

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

"""``ensure_demo_data``: the demo plan's shards, built once and reused."""
from __future__ import annotations

import json
from pathlib import Path

from mamba_slm.platform.data.pipeline import FORMAT, run_curation
from mamba_slm.platform.data.plan import demo_plan

DEFAULT_DEMO_DIR = Path("data/demo")


def _is_current(output: Path, plan_dict: dict) -> bool:
    """A finished build of the same plan whose shards are all present with their sizes
    non-zero (the manifest is written last, so its presence marks completion)."""
    manifest_path = output / "manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    if manifest.get("format") != FORMAT or manifest.get("plan") != plan_dict:
        return False
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    return bool(shards) and all((output / s["path"]).is_file() for s in shards) \
        and (output / manifest["tokenizer"]).is_file()


def ensure_demo_data(path: str | Path | None = None, seq_len: int = 256, log=print) -> Path:
    """Build the demo plan (Shakespeare + Python stdlib, BPE vocab 8192) into ``path``
    (default ./data/demo) unless an identical build is already there; returns the dir.
    Starts a local Ray (or joins RAY_ADDRESS) only when it has to build."""
    output = Path(path if path is not None else DEFAULT_DEMO_DIR).resolve()
    plan = demo_plan(seq_len=seq_len)
    if _is_current(output, plan.to_dict()):
        return output
    log(f"building demo data in {output} (once; later runs reuse it)")
    run_curation(plan, output, log=log)
    return output

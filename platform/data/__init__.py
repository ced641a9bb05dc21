"""Data curation: sources -> quality filters -> dedup -> tokenizer -> packed shards.

Entry points: ``run_curation(plan, output)`` (the job behind ``jobs/curate.py``),
``get_plan("demo" | "production" | plan.json)``, and ``ensure_demo_data()`` for the
training job's default run.
"""
from mamba_slm.platform.data.demo import ensure_demo_data
from mamba_slm.platform.data.pipeline import run_curation
from mamba_slm.platform.data.plan import CurationPlan, SourceSpec, TokenizerConfig, get_plan

__all__ = ["CurationPlan", "SourceSpec", "TokenizerConfig", "ensure_demo_data", "get_plan", "run_curation"]

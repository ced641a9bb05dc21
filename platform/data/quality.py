"""Text normalization and explainable quality filters.

Every filter is a named threshold; a rejected document gets the name of the first
threshold it failed (``quality_reason``), so the report can say *why* text was dropped.
Thresholds come from public pipelines and are cited where they are defined:

- Gopher: Rae et al. 2021, "Scaling Language Models", appendix A ("MassiveText quality
  filters": 50..100k words, mean word length 3..10, symbol/word <= 0.1, >= 80% of words
  alphabetic, >= 2 stop words, repetition thresholds).
- C4: Raffel et al. 2020, section 2.2 (lines ending in terminal punctuation, no "lorem
  ipsum", >= 3 sentences...); FineWeb: Penedo et al. 2024 (line-punctuation <= 0.12
  fraction of short lines, duplicated-line-chars <= 0.1).
- RefinedWeb: Penedo et al. 2023 (same Gopher repetition set, applied to lines).
- Code: Codex / The Stack heuristics (Chen et al. 2021; Kocetkov et al. 2022): max line
  length <= 1000, mean line length <= 100, alphanumeric fraction >= 0.25.

Profiles (``QUALITY_PROFILES``) pick which thresholds apply to which kind of source:
web text gets the full Gopher/C4 set; code gets the Stack set; plays and books keep the
Gopher document-level checks but not the line-repetition ones (a play repeats speaker
names on every other line by design).
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_HAS_LETTER = re.compile(r"[^\W\d_]")
_NOT_ALNUM = re.compile(r"[\W_]+")
_EDGE_PUNCT = "\"'.,;:!?()[]{}<>-*_`"
# Gopher's stop words: "the, be, to, of, and, that, have, with" (Rae et al. 2021, A.1.1).
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})


def normalize(text: str) -> str:
    """Unicode NFC, unify newlines, drop control characters (keeping \\n and \\t),
    strip trailing spaces per line and collapse runs of blank lines. Indentation is kept
    (code depends on it)."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("\n", text + "\n")
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


@dataclass(frozen=True)
class QualityThresholds:
    """Quality thresholds; ``None`` switches a check off. Checked in field order."""

    min_chars: int | None = 200             # below this a "document" is a fragment (FineWeb drops < 200 chars-ish pages via min words)
    max_chars: int | None = 1_000_000       # giant docs: generated dumps, logs, data tables
    min_words: int | None = 50              # Gopher: 50 <= words <= 100,000
    max_words: int | None = 100_000         # Gopher
    min_mean_word_len: float | None = 3.0   # Gopher: mean word length in [3, 10]
    max_mean_word_len: float | None = 10.0  # Gopher
    min_alpha_words: float | None = 0.8     # Gopher: >= 80% of words contain a letter
    max_symbol_ratio: float | None = 0.1    # Gopher: ("#" + "...") per word <= 0.1
    min_stop_words: int | None = 2          # Gopher: >= 2 of its 8 stop words
    min_alnum_frac: float | None = None     # The Stack: alphanumeric chars >= 25%
    max_line_len: int | None = None         # The Stack / Codex: max line length <= 1000
    max_mean_line_len: float | None = None  # The Stack / Codex: mean line length <= 100
    min_punct_lines: float | None = None    # C4 (relaxed by FineWeb): >= 12% of lines end in . ! ? "
    max_dup_line_frac: float | None = None  # Gopher/RefinedWeb: duplicate lines <= 30%
    max_dup_line_chars: float | None = None  # Gopher: chars in duplicate lines <= 20% (FineWeb 10%)
    max_top_ngram_chars: tuple[float, float, float] | None = None  # Gopher: top 2/3/4-gram <= .20/.18/.16
    max_dup_ngram_chars: tuple[float, ...] | None = None  # Gopher: dup 5..10-grams <= .15 .14 .13 .12 .11 .10

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"QualityThresholds.{f.name} must be >= 0 or None, got {value}")
        if self.max_top_ngram_chars is not None and len(self.max_top_ngram_chars) != 3:
            raise ValueError("QualityThresholds.max_top_ngram_chars needs 3 values (2-, 3-, 4-grams)")
        if self.max_dup_ngram_chars is not None and len(self.max_dup_ngram_chars) != 6:
            raise ValueError("QualityThresholds.max_dup_ngram_chars needs 6 values (5- to 10-grams)")


GOPHER_TOP_NGRAM = (0.20, 0.18, 0.16)
GOPHER_DUP_NGRAM = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)

QUALITY_PROFILES: dict[str, QualityThresholds] = {
    # Web pages: the full Gopher + C4/FineWeb line set.
    "web": QualityThresholds(
        min_punct_lines=0.12, max_dup_line_frac=0.30, max_dup_line_chars=0.20,
        max_top_ngram_chars=GOPHER_TOP_NGRAM, max_dup_ngram_chars=GOPHER_DUP_NGRAM,
    ),
    # Books, plays, papers: Gopher document checks plus the n-gram repetition checks that
    # catch boilerplate; line repetition is normal here (speaker names, headings).
    "book": QualityThresholds(
        max_top_ngram_chars=GOPHER_TOP_NGRAM, max_dup_ngram_chars=(0.5, 0.45, 0.4, 0.35, 0.3, 0.25),
    ),
    # Source code: word statistics do not apply; The Stack / Codex line heuristics do.
    "code": QualityThresholds(
        min_chars=100, min_words=None, max_words=None, min_mean_word_len=None,
        max_mean_word_len=None, min_alpha_words=None, max_symbol_ratio=None,
        min_stop_words=None, min_alnum_frac=0.25, max_line_len=1000, max_mean_line_len=100.0,
    ),
}


def _word_id_array(words: list[str]) -> np.ndarray:
    """Each word's index in order of first appearance. (A fixed-width numpy string array
    costs words x the longest word x 4 bytes: one 60k-character token made it 22 GB.)"""
    index: dict[str, int] = {}
    return np.fromiter((index.setdefault(w, len(index)) for w in words), dtype=np.uint64, count=len(words))


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of each n-gram of word ids, (len(ids) - n + 1,) uint64."""
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(1_000_003) + ids[k: len(ids) - n + 1 + k] + np.uint64(1)
    return h


def _top_ngram_frac(ids: np.ndarray, lens: np.ndarray, n: int) -> float:
    """Gopher: chars in the most frequent n-gram (all occurrences) / chars in all words."""
    if len(ids) < n:
        return 0.0
    h = _ngram_hashes(ids, n)
    uniq, first, counts = np.unique(h, return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    start = first[top]
    return float(lens[start:start + n].sum() * counts[top] / lens.sum())


def _dup_ngram_frac(ids: np.ndarray, lens: np.ndarray, n: int) -> float:
    """Gopher: chars of words covered by any n-gram that occurs more than once / all."""
    if len(ids) < n:
        return 0.0
    h = _ngram_hashes(ids, n)
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    dup_starts = np.flatnonzero(counts[inverse] > 1)
    if len(dup_starts) == 0:
        return 0.0
    covered = np.zeros(len(ids) + 1, dtype=np.int32)
    np.add.at(covered, dup_starts, 1)
    np.add.at(covered, dup_starts + n, -1)
    mask = np.cumsum(covered[:-1]) > 0
    return float(lens[mask].sum() / lens.sum())


def _line_checks(text: str, t: QualityThresholds) -> str | None:
    lines = text.split("\n")
    line_lens = np.fromiter((len(s) for s in lines), dtype=np.int64, count=len(lines))
    if t.max_line_len is not None and line_lens.max() > t.max_line_len:
        return "max_line_len"
    if t.max_mean_line_len is not None and line_lens.mean() > t.max_mean_line_len:
        return "mean_line_len"
    nonempty = [s.strip() for s in lines if s.strip()]
    if not nonempty:
        return "empty"
    if t.min_punct_lines is not None:
        ends = sum(s.endswith((".", "!", "?", '"', "'")) for s in nonempty)
        if ends / len(nonempty) < t.min_punct_lines:
            return "line_punctuation"
    if t.max_dup_line_frac is not None or t.max_dup_line_chars is not None:
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for s in nonempty:
            if s in seen:
                dup_lines += 1
                dup_chars += len(s)
            seen.add(s)
        if t.max_dup_line_frac is not None and dup_lines / len(nonempty) > t.max_dup_line_frac:
            return "dup_line_frac"
        total = sum(len(s) for s in nonempty)
        if t.max_dup_line_chars is not None and dup_chars / total > t.max_dup_line_chars:
            return "dup_line_chars"
    return None


def quality_reason(text: str, t: QualityThresholds) -> str | None:
    """Name of the first failed check for a normalized document, or None if it passes."""
    n_chars = len(text)
    if n_chars == 0:
        return "empty"
    if t.min_chars is not None and n_chars < t.min_chars:
        return "too_short"
    if t.max_chars is not None and n_chars > t.max_chars:
        return "too_long"
    words = text.split()  # Gopher counts whitespace-separated words
    n_words = len(words)
    if t.min_words is not None and n_words < t.min_words:
        return "too_few_words"
    if t.max_words is not None and n_words > t.max_words:
        return "too_many_words"
    if n_words:
        lens = np.fromiter((len(w) for w in words), dtype=np.int64, count=n_words)
        mean_len = lens.mean()
        if t.min_mean_word_len is not None and mean_len < t.min_mean_word_len:
            return "mean_word_len"
        if t.max_mean_word_len is not None and mean_len > t.max_mean_word_len:
            return "mean_word_len"
        if t.min_alpha_words is not None:
            alpha = sum(_HAS_LETTER.search(w) is not None for w in words)
            if alpha / n_words < t.min_alpha_words:
                return "alpha_words"
        if t.max_symbol_ratio is not None:
            symbols = text.count("#") + text.count("...") + text.count("\u2026")
            if symbols / n_words > t.max_symbol_ratio:
                return "symbol_ratio"
        if t.min_stop_words is not None:
            lower = {w.strip(_EDGE_PUNCT).lower() for w in words}
            if len(lower & _STOP_WORDS) < t.min_stop_words:
                return "stop_words"
    if t.min_alnum_frac is not None:
        alnum = len(_NOT_ALNUM.sub("", text))
        if alnum / n_chars < t.min_alnum_frac:
            return "alnum_frac"
    reason = _line_checks(text, t)
    if reason is not None:
        return reason
    if n_words and (t.max_top_ngram_chars is not None or t.max_dup_ngram_chars is not None):
        ids = _word_id_array([w.lower() for w in words])
        if t.max_top_ngram_chars is not None:
            for n, limit in zip((2, 3, 4), t.max_top_ngram_chars):
                if _top_ngram_frac(ids, lens, n) > limit:
                    return f"top_{n}gram"
        if t.max_dup_ngram_chars is not None:
            for n, limit in zip(range(5, 11), t.max_dup_ngram_chars):
                if _dup_ngram_frac(ids, lens, n) > limit:
                    return f"dup_{n}gram"
    return None

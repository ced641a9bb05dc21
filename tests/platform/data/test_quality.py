"""Each quality filter on crafted documents: the failing check is the one named."""
import random

import pytest

from mamba_slm.platform.data.quality import QUALITY_PROFILES, QualityThresholds, normalize, quality_reason

PROSE = ("The committee met on a grey morning to weigh the proposal that had been circulating "
         "for weeks. Several members argued that the plan was sound, and that the town would "
         "benefit from a new library with longer opening hours. Others worried about the cost "
         "of staffing it through the winter, when fewer people visit. After a long discussion "
         "they agreed to publish the figures and to hold a public meeting before any vote. ")
WEB, BOOK, CODE = QUALITY_PROFILES["web"], QUALITY_PROFILES["book"], QUALITY_PROFILES["code"]


def test_normalize_nfc_controls_whitespace():
    text = "Cafe\u0301\r\nline\x00two  \t\n\n\n\n\tindented\x1b end  "
    assert normalize(text) == "Caf\u00e9\nlinetwo\n\n\tindented end"


def test_clean_prose_passes_web_and_book():
    assert quality_reason(PROSE, WEB) is None
    assert quality_reason(PROSE, BOOK) is None


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("Short text.", "too_short"),
    ("word " * 30 + "a" * 200, "too_few_words"),
    (" ".join(["extraordinarilylongwordsonly"] * 80) + " the and.", "mean_word_len"),
    (" ".join(["1234 5678 9012"] * 40) + " the and of with words here.", "alpha_words"),
    (PROSE + " #tag" * 30, "symbol_ratio"),
    ("Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod " * 8, "stop_words"),
])
def test_document_filters(text, reason):
    assert quality_reason(text, WEB) == reason


def test_too_long_and_too_many_words():
    t = QualityThresholds(max_chars=1000)
    assert quality_reason(PROSE * 5, t) == "too_long"
    assert quality_reason(PROSE * 5, QualityThresholds(max_words=100)) == "too_many_words"


def test_line_filters():
    no_punct = "\n".join(f"Menu item number {i} for the home page and the shop" for i in range(40))
    assert quality_reason(no_punct, WEB) == "line_punctuation"
    dup_lines = PROSE + "\n" + "\n".join(["Click here to subscribe to the newsletter."] * 20)
    assert quality_reason(dup_lines, WEB) == "dup_line_frac"
    # Plays repeat speaker lines; the book profile does not reject that.
    words = PROSE.split()
    rng = random.Random(0)
    play = "\n".join(f"Ham.\n{' '.join(rng.sample(words, 10))}." for _ in range(30))
    assert quality_reason(play, BOOK) is None


def test_repeated_ngram_filters():
    top = PROSE + " ".join(["public meeting"] * 60)
    assert quality_reason(top, BOOK) == "top_2gram"
    repeated = " ".join([PROSE] * 4)  # every 5-gram occurs 4 times
    assert quality_reason(repeated, BOOK).startswith("dup_")


def test_code_profile():
    good = ('def add(a, b):\n    """Sum of two numbers."""\n    return a + b\n\n\n'
            'class Point:\n    x: int = 0\n    y: int = 0\n\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n')
    assert quality_reason(good, CODE) is None
    assert quality_reason(good + "x = '" + "a" * 1200 + "'\n", CODE) == "max_line_len"
    assert quality_reason("\n".join(["y = " + "1" * 150] * 3), CODE) == "mean_line_len"
    assert quality_reason("{}\n" + "[] () {} <> ;; ,, ..\n" * 20, CODE) == "alnum_frac"


def test_invalid_thresholds_are_rejected():
    with pytest.raises(ValueError, match="min_chars"):
        QualityThresholds(min_chars=-1)
    with pytest.raises(ValueError, match="max_top_ngram_chars"):
        QualityThresholds(max_top_ngram_chars=(0.1,))


def test_one_very_long_token_costs_no_memory_blowup():
    """A page with one 20,000-character blob (base64, minified JS) among 3,000 words: the
    word statistics and MinHash keys used a fixed-width numpy string array (words x the
    longest word x 4 bytes: 240 MB here, 22 GB for a 60k blob in 33k words)."""
    import tracemalloc

    from mamba_slm.platform.data import dedup, quality

    words = [f"w{i % 500}" for i in range(3000)] + ["x" * 20_000]
    tracemalloc.start()
    ids = quality._word_id_array(words)
    hashes = dedup._stable_word_hashes(words)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6, f"peak {peak / 1e6:.0f} MB"
    assert ids[0] == ids[500] and ids[0] != ids[1] and ids[-1] == 500  # first-appearance ids
    assert hashes[0] == hashes[500] and len(set(hashes.tolist())) == 501

"""MinHash LSH, duplicate clustering and packing on crafted inputs."""
import numpy as np

from mamba_slm.platform.data import dedup
from mamba_slm.platform.data.pack import pack_documents
from mamba_slm.platform.data.plan import DedupConfig

CFG = DedupConfig()
BASE = " ".join(f"word{i} alpha beta gamma delta{i % 7}" for i in range(300))


def shared_bands(a: str, b: str) -> int:
    return int((dedup.minhash_bands(a, CFG) == dedup.minhash_bands(b, CFG)).sum())


def test_minhash_near_duplicates_share_bands_distinct_do_not():
    near = BASE.replace("word5 ", "changed ", 1).replace("word77 ", "edited ", 1)
    other = " ".join(f"token{i} zeta eta theta iota{i % 5}" for i in range(300))
    assert shared_bands(BASE, BASE) == CFG.bands
    assert shared_bands(BASE, near) >= 1
    assert shared_bands(BASE, other) == 0


def test_minhash_is_stable_across_processes():
    # Python's str hash is salted per process; the bands must not be.
    import subprocess
    import sys
    code = ("from mamba_slm.platform.data import dedup; from mamba_slm.platform.data.plan import DedupConfig;"
            "print(dedup.minhash_bands('a b c d e f g h', DedupConfig()).tolist())")
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONHASHSEED": str(s), "PATH": ""}).stdout for s in (1, 2)}
    assert len(out) == 1 and out.pop().startswith("[")


def test_duplicate_edges_and_components():
    kind = np.array([0, 0, 1, 1, 1, 0], dtype=np.int8)
    key = np.array([5, 5, 9, 9, 3, 7], dtype=np.int64)
    doc = np.array([30, 10, 20, 30, 40, 50], dtype=np.int64)
    e = dedup.duplicate_edges(kind, key, doc)
    assert sorted(zip(e["kind"].tolist(), e["root"].tolist(), e["member"].tolist())) == [(0, 10, 30), (1, 20, 30)]
    removal = dedup.removal_from_edges(e["kind"], e["root"], e["member"])
    # 10 -exact- 30 -near- 20: one cluster, 10 survives; 30 is an exact copy, 20 a near one.
    assert removal["doc_id"].tolist() == [20, 30]
    assert removal["exact"].tolist() == [False, True]


def test_connected_components_long_chain():
    u = np.arange(1, 200, dtype=np.int64)[::-1]
    nodes, roots = dedup.connected_components(u, u - 1)
    assert (roots == 0).all() and len(nodes) == 200


def test_pack_documents_layout():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9, 10, 11])]
    ids, doc_ids, dropped = pack_documents(docs, eos_id=0, seq_len=4)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 11, 0]
    assert ids.shape == (2, 5) and ids.dtype == np.int32
    assert ids.reshape(-1).tolist() == stream[:10] and dropped == 4
    assert doc_ids.tolist() == [[0, 0, 0, 0, 1], [1, 1, 2, 2, 2]][:1] + [[0, 0, 1, 1, 1]]
    # EOS ends its own document: the token after every EOS starts the next doc id.
    row = ids[0]
    assert row[3] == 0 and doc_ids[0, 3] == 0 and doc_ids[0, 4] == 1


def test_val_threshold_is_corpus_wide():
    """val_fraction when some document's hash falls below it; else the single lowest
    document; none for a one-document corpus (all of it is training data)."""
    from mamba_slm.platform.data.pipeline import val_threshold
    from mamba_slm.platform.data.plan import demo_plan

    plan = demo_plan()
    chunks = [{"docs": {"a": 3}, "val_docs": 0, "min_u": 0.4}, {"docs": {"a": 2}, "val_docs": 0, "min_u": 0.3}]
    low = val_threshold(plan, chunks)
    assert 0.3 < low < 0.3 + 1e-12  # only the lowest document, wherever its chunk
    chunks[0]["val_docs"] = 1
    assert val_threshold(plan, chunks) == plan.val_fraction
    assert val_threshold(plan, [{"docs": {"a": 1}, "val_docs": 0, "min_u": 0.7}]) == 0.0
    assert val_threshold(plan.replace(val_fraction=0.0), chunks) == 0.0

"""The curation report: documents in/out per source and reason, tokens per source,
throughput per stage. Saved as report.json and printed as a table."""
from __future__ import annotations

from collections import Counter

from mamba_slm.platform.data.plan import CurationPlan


def build_report(plan: CurationPlan, cleaned, removal, removed_by_source, tokenized, available,
                 ratios, packed, splits, timings, elapsed) -> dict:
    names = [s.name for s in plan.sources]
    documents, bytes_in = {}, Counter()
    for r in cleaned:
        bytes_in.update(r["bytes_in"])
    for name in names:
        reasons = Counter()
        for r in cleaned:
            reasons.update(r["reasons"].get(name, {}))
        reasons.update(removed_by_source.get(name, {}))
        kept_clean = reasons.pop("kept", 0)
        out = sum(r["docs"].get(name, 0) for r in tokenized)
        documents[name] = {"in": kept_clean + sum(v for k, v in reasons.items() if not k.startswith("duplicate")),
                           "out": out, "dropped": dict(sorted(reasons.items()))}
    selected = Counter()
    for r in packed:
        selected.update(r["selected_tokens"])
    targets = plan.source_targets()
    tokens_per_source = {
        name: {"available": int(available.get(name, 0)), "target": targets[name],
               "copies_per_doc": round(ratios[i], 4), "selected": int(selected.get(name, 0))}
        for i, name in enumerate(names)}
    tokenized_tokens = sum(sum(r["tokens"].values()) for r in tokenized)
    total_bytes = sum(bytes_in.values())
    return {
        "plan": plan.name, "documents": documents, "tokens_per_source": tokens_per_source,
        "bytes_in": dict(bytes_in), "duplicates_removed": int(len(removal["doc_id"])),
        "pack_dropped_tokens": int(sum(r["dropped_tokens"] for r in packed)),
        "splits": {k: {"shards": len(v["shards"]), "rows": v["rows"], "tokens": v["tokens"]} for k, v in splits.items()},
        "stage_seconds": timings, "elapsed_seconds": round(elapsed, 2),
        "throughput": {
            "input_mb_per_s": round(total_bytes / 1e6 / max(elapsed, 1e-9), 3),
            "clean_mb_per_s": round(total_bytes / 1e6 / max(timings.get("clean", 0), 1e-9), 3),
            "tokenize_tokens_per_s": round(tokenized_tokens / max(timings.get("tokenize", 0), 1e-9)),
        },
    }


def format_report(report: dict) -> str:
    lines = [f"== curation report: plan {report['plan']!r} in {report['elapsed_seconds']:.1f}s =="]
    lines.append(f"{'source':<16}{'docs in':>9}{'out':>8}  dropped (reason: count)")
    for name, d in report["documents"].items():
        dropped = ", ".join(f"{k}: {v}" for k, v in d["dropped"].items()) or "-"
        lines.append(f"{name:<16}{d['in']:>9}{d['out']:>8}  {dropped}")
    lines.append(f"{'source':<16}{'available':>12}{'target':>12}{'copies/doc':>12}{'selected':>12}")
    for name, t in report["tokens_per_source"].items():
        target = "all" if t["target"] is None else f"{t['target']:,}"
        lines.append(f"{name:<16}{t['available']:>12,}{target:>12}{t['copies_per_doc']:>12.3f}{t['selected']:>12,}")
    for split, s in report["splits"].items():
        lines.append(f"{split}: {s['shards']} shards, {s['rows']:,} rows, {s['tokens']:,} tokens")
    tp = report["throughput"]
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report["stage_seconds"].items())
    lines.append(f"throughput: {tp['input_mb_per_s']:.2f} MB/s input overall, clean {tp['clean_mb_per_s']:.2f} MB/s, "
                 f"tokenize {tp['tokenize_tokens_per_s']:,} tokens/s  ({stages})")
    return "\n".join(lines)

"""Choosing the semantic cache's similarity threshold from human-labelled paraphrase pairs.

A pair (cached question, new question) with cosine ≥ threshold is a hit; a hit on a non-duplicate pair is a
false hit (the answer to another question is served). The threshold is the lowest one at which the false-hit
share (false hits / hits) stays within the target on the fit part of QQP (real user questions); every figure
reported is then measured on a held-out part that shares no text with the fit part. Data: the paraphrase
pack (`$FRUGAL_DATA_DIR/paraphrase`, MANIFEST.md there), read in place, never copied.

QQP's own labels are noisy exactly where a cache operates (identical questions labelled "different"), so
the QQP pairs a cache could serve were re-judged blind by a panel of three annotators (`qqp_audit.jsonl`
beside this file: pair ids and verdicts only; protocol in docs/semantic-cache-audit.md). With the audit,
a QQP pair's label is the panel's majority where it has one, the source's label elsewhere; every figure on
QQP is also reported against the source's labels alone.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.cache.calibration.verifier_fit import fit as fit_verifier
from gateway.cache.guard import compatible
from gateway.cache.verifier import FEATURES, MIN_SIMILARITY, features, probability

SOURCES = ("qqp", "paws_qqp", "paws_wiki", "mqp", "mrpc")
MAIN = "qqp"
HOLDOUT_PERCENT = 30
TARGET_FALSE_HIT_SHARE = 0.01
#: Below this many hits a false-hit share is noise (one false hit in 20 is 5%); such thresholds are not judged.
MIN_HITS = 200
#: Duplicates in the full QQP release (404,290 pairs); the pack's QQP partition is 50/50 by construction.
NATURAL_QQP_DUPLICATE_SHARE = 0.369
REPO = Path(__file__).resolve().parents[3]
#: The panel's verdicts on QQP pairs (docs/semantic-cache-audit.md).
AUDIT_PATH = Path(__file__).with_name("qqp_audit.jsonl")

#: How far below the lowest cosine the verifier served (rounded down to 0.01) the index is queried.
LOOKUP_MARGIN = 0.01
#: Word-swap pairs the verifier also learns from (their fit parts), so that it does not take the same words
#: in another order for the same question.
VERIFIER_EXTRA_TRAINING = ("paws_qqp", "paws_wiki")

Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True, slots=True)
class Pair:
    pair_id: str
    text_a: str
    text_b: str
    duplicate: bool


def paraphrase_dir(data_dir: Path | None = None) -> Path:
    """The pack's folder: `data_dir`, else $FRUGAL_DATA_DIR, else ../shared/data next to the repository."""
    base = data_dir or Path(os.environ.get("FRUGAL_DATA_DIR") or REPO.parent / "shared" / "data")
    return Path(base) / "paraphrase"


def load_pairs(folder: Path, source: str, limit: int | None = None) -> list[Pair]:
    pairs = []
    with gzip.open(folder / f"{source}.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            pairs.append(Pair(row["pair_id"], row["text_a"], row["text_b"], bool(row["duplicate"])))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def load_audit(path: Path = AUDIT_PATH) -> dict[str, list[str]]:
    """The panel's verdicts by pair id: each a list of "same", "different" or "unsure"."""
    audit: dict[str, list[str]] = {}
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                audit[row["pair_id"]] = list(row["verdicts"])
    return audit


#: A pair is re-labelled only where at least this many annotators judged it. (The audit also holds 150
#: random held-out pairs judged once, a control on how the annotators read QQP's ordinary pairs.)
PANEL = 3


def panel_says_same(verdicts: list[str]) -> bool:
    """The panel's label: the same question when more than half of the verdicts say so ("unsure" counts
    against, as a cache should)."""
    return 2 * verdicts.count("same") > len(verdicts)


def judged_labels(pairs: list[Pair], audit: dict[str, list[str]]) -> np.ndarray:
    """Each pair's label: the panel's where at least `PANEL` annotators judged it, the source's elsewhere."""
    return np.array([panel_says_same(audit[p.pair_id]) if len(audit.get(p.pair_id, ())) >= PANEL else p.duplicate
                     for p in pairs], dtype=bool)


def groups(pairs: list[Pair]) -> list[str]:
    """Each pair's group: the smallest pair id among the pairs linked to it by a shared text (case and
    spacing ignored)."""
    parent = list(range(len(pairs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        for text in (pair.text_a, pair.text_b):
            key = " ".join(text.lower().split())
            j = first_with.setdefault(key, i)
            parent[root(i)] = root(j)
    representative: dict[int, str] = {}
    for i, pair in enumerate(pairs):
        r = root(i)
        representative[r] = min(representative.get(r, pair.pair_id), pair.pair_id)
    return [representative[root(i)] for i in range(len(pairs))]


def held_out(pairs: list[Pair], percent: int = HOLDOUT_PERCENT) -> np.ndarray:
    """Which pairs are held out: whole groups of pairs linked by a shared text, chosen by a hash of the
    group's smallest pair id, so that no text is in both parts."""
    salt = b"frugal-semantic-holdout:"
    return np.array([int(hashlib.sha256(salt + group.encode()).hexdigest(), 16) % 100 < percent
                     for group in groups(pairs)], dtype=bool)


def pair_scores(pairs: list[Pair], embed: Embed) -> np.ndarray:
    """Cosine similarity of each pair's two texts (each distinct text embedded once)."""
    texts = list(dict.fromkeys(t for p in pairs for t in (p.text_a, p.text_b)))
    row = {t: i for i, t in enumerate(texts)}
    vectors = embed(texts)
    a = vectors[[row[p.text_a] for p in pairs]]
    b = vectors[[row[p.text_b] for p in pairs]]
    return np.einsum("ij,ij->i", a, b)


def measure(scores: np.ndarray, duplicate: np.ndarray, threshold: float,
            duplicate_share: float | None = None) -> dict[str, Any]:
    """Hits, false-hit share, false-positive rate and recall at `threshold`; with `duplicate_share`, the
    false-hit share the same rates give at that share of duplicates (reweighting the negatives)."""
    hit = scores >= threshold
    positives, negatives = int(duplicate.sum()), int((~duplicate).sum())
    true_hits, false_hits = int((hit & duplicate).sum()), int((hit & ~duplicate).sum())
    recall = true_hits / positives if positives else None
    fpr = false_hits / negatives if negatives else None
    out: dict[str, Any] = {
        "pairs": len(scores), "duplicates": positives, "hits": true_hits + false_hits, "false_hits": false_hits,
        "false_hit_share": false_hits / (true_hits + false_hits) if true_hits + false_hits else 0.0,
        "false_positive_rate": fpr, "recall": recall,
    }
    if duplicate_share is not None and recall is not None and fpr is not None:
        served = recall * duplicate_share + fpr * (1 - duplicate_share)
        out["false_hit_share_at_base_rate"] = fpr * (1 - duplicate_share) / served if served else 0.0
        out["base_rate"] = duplicate_share
    return out


def _ranked(scores: np.ndarray, duplicate: np.ndarray, min_hits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores best first, the false-hit share of serving the top k, and which k are judged cuts (the last of
    a run of equal scores, with at least `min_hits` hits)."""
    order = np.argsort(-scores, kind="stable")
    ranked, labels = scores[order], duplicate[order]
    false_share = np.cumsum(~labels) / np.arange(1, len(labels) + 1)
    cut = np.r_[ranked[1:] < ranked[:-1], True] & np.isfinite(ranked)
    return ranked, false_share, cut & (np.arange(1, len(labels) + 1) >= min_hits)


def lowest_false_hit_share(scores: np.ndarray, duplicate: np.ndarray, min_hits: int = MIN_HITS) -> float:
    """The best false-hit share any threshold serving at least `min_hits` hits reaches: the data's floor."""
    _, false_share, judged = _ranked(scores, duplicate, min_hits)
    if not judged.any():
        raise ValueError(f"fewer than {min_hits} pairs to judge")
    return float(false_share[judged].min())


def choose_threshold(scores: np.ndarray, duplicate: np.ndarray, target: float = TARGET_FALSE_HIT_SHARE,
                     min_hits: int = MIN_HITS) -> float:
    """The lowest threshold at which the false-hit share of all it serves is ≤ target (among thresholds that
    serve at least `min_hits` hits). ValueError when no threshold qualifies."""
    ranked, false_share, judged = _ranked(scores, duplicate, min_hits)
    candidates = np.flatnonzero(judged & (false_share <= target))
    if len(candidates) == 0:
        raise ValueError(f"no threshold keeps the false-hit share ≤ {target:.1%} with ≥ {min_hits} hits")
    return float(ranked[candidates[-1]])


def curve(scores: np.ndarray, duplicate: np.ndarray) -> dict[str, list[float]]:
    """Precision and recall at every threshold (for the plot), thinned to ~200 points."""
    order = np.argsort(-scores, kind="stable")
    labels = duplicate[order]
    true_hits = np.cumsum(labels)
    precision = true_hits / np.arange(1, len(labels) + 1)
    recall = true_hits / max(1, int(labels.sum()))
    keep = np.unique(np.linspace(0, len(labels) - 1, 200).astype(int))
    return {"threshold": scores[order][keep].round(4).tolist(), "precision": precision[keep].round(4).tolist(),
            "recall": recall[keep].round(4).tolist()}


def _verifier_scores(data: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
    """Fit the match verifier on QQP's fit part (its labels: the panel's where it judged) and the fit parts
    of the word-swap sets present. Returns the exported model, its out-of-fold probabilities on every QQP fit
    pair (0 below the verifier's minimum cosine) and the fitted model's probabilities on every pair of every
    source."""

    def rows(d: dict[str, Any], keep: np.ndarray) -> np.ndarray:
        found = [features(p.text_a, p.text_b, float(c)) for p, c, k in zip(d["pairs"], d["scores"], keep, strict=True)
                 if k]
        return np.array(found).reshape(-1, len(FEATURES))

    main = data[MAIN]
    fit = ~main["held_out"]
    candidate = fit & (main["scores"] >= MIN_SIMILARITY)
    extra = [(d, ~d["held_out"] & (d["scores"] >= MIN_SIMILARITY))
             for source, d in data.items() if source in VERIFIER_EXTRA_TRAINING]
    model, out_of_fold = fit_verifier(
        rows(main, candidate), main["labels"][candidate], np.array(main["groups"])[candidate],
        np.vstack([rows(d, keep) for d, keep in extra]) if extra else None,
        np.concatenate([d["labels"][keep] for d, keep in extra]) if extra else None)
    fit_scores = np.zeros(len(main["scores"]))
    fit_scores[candidate] = out_of_fold
    everywhere = {source: np.array([probability(model, features(p.text_a, p.text_b, float(c)))
                                    if c >= MIN_SIMILARITY else 0.0
                                    for p, c in zip(d["pairs"], d["scores"], strict=True)])
                  for source, d in data.items()}
    return model, fit_scores[fit], everywhere


def _audit_summary(main: dict[str, Any], audit: dict[str, list[str]]) -> dict[str, Any]:
    """How much of QQP the panel judged, and how often its majority differs from QQP's label."""
    counts = np.array([len(audit.get(p.pair_id, ())) for p in main["pairs"]])
    judged = counts >= PANEL
    differs = judged & (main["labels"] != main["duplicate"])
    panels = [audit[p.pair_id] for p, n in zip(main["pairs"], counts, strict=True) if n >= PANEL]
    control = [(panel_says_same(audit[p.pair_id]), p.duplicate) for p, n in zip(main["pairs"], counts, strict=True)
               if 0 < n < PANEL]
    return {"pairs_judged": int(judged.sum()), "held_out_judged": int((judged & main["held_out"]).sum()),
            "panel_differs_from_qqp": int(differs.sum()),
            "qqp_duplicates_panel_calls_different": int((differs & main["duplicate"]).sum()),
            "qqp_non_duplicates_panel_calls_same": int((differs & ~main["duplicate"]).sum()),
            "unanimous_share": round(sum(len(set(v)) == 1 for v in panels) / max(1, len(panels)), 4),
            "control_pairs": len(control),
            "control_agreement_with_qqp": round(sum(a == b for a, b in control) / max(1, len(control)), 4)}


def calibrate(folder: Path, embed: Embed, *, audit: dict[str, list[str]] | None = None,
              limit: int | None = None, sources: tuple[str, ...] = SOURCES, target: float = TARGET_FALSE_HIT_SHARE,
              min_hits: int = MIN_HITS) -> dict[str, Any]:
    """Fit each rule on QQP's fit part (cosine alone, cosine + the guard, cosine + the learned verifier) and
    report it on every source's held-out part. `audit` (see `load_audit`) replaces QQP's labels by the
    panel's where it judged; None uses QQP's labels alone. `limit` reads only the first pairs of each source
    (for quick checks). The verifier's fitted model is in the report under `verifier_model`."""
    if MAIN not in sources:
        raise ValueError(f"the threshold is fitted on {MAIN}; it must be among the sources")
    data: dict[str, dict[str, Any]] = {}
    for source in sources:
        pairs = load_pairs(folder, source, limit)
        duplicate = np.array([p.duplicate for p in pairs], dtype=bool)
        data[source] = {"pairs": pairs, "scores": pair_scores(pairs, embed), "duplicate": duplicate,
                        "labels": judged_labels(pairs, audit) if audit and source == MAIN else duplicate,
                        "guarded": np.array([compatible(p.text_a, p.text_b) for p in pairs], dtype=bool),
                        "groups": groups(pairs), "held_out": held_out(pairs)}
    main = data[MAIN]
    fit = ~main["held_out"]
    model, verifier_fit_scores, verifier_scores = _verifier_scores(data)
    # Each rule: its score of every pair of every source, and the scores its threshold is chosen on (the fit
    # part of QQP; for the verifier, out-of-fold, never from a model that saw the pair).
    rule_scores = {
        "cosine": ({s: d["scores"] for s, d in data.items()}, main["scores"][fit]),
        "cosine+guard": ({s: np.where(d["guarded"], d["scores"], -np.inf) for s, d in data.items()},
                         np.where(main["guarded"], main["scores"], -np.inf)[fit]),
        "cosine+verifier": (verifier_scores, verifier_fit_scores),
    }
    fit_labels = main["labels"][fit]
    rules: dict[str, dict[str, Any]] = {}
    for rule, (scores, fit_scores) in rule_scores.items():
        floor = lowest_false_hit_share(fit_scores, fit_labels, min_hits)
        met = floor <= target
        # When the labels themselves put a floor above the target (QQP's own labels do: near-identical
        # questions labelled different), aim at the floor plus the target instead, and say so.
        aim = target if met else floor + target
        threshold = choose_threshold(fit_scores, fit_labels, aim, min_hits)
        report: dict[str, Any] = {"threshold": round(threshold, 4), "threshold_exact": threshold,
                                  "target_met_on_fit": met,
                                  "lowest_false_hit_share_on_fit": round(floor, 4), "aimed_at": round(aim, 4),
                                  "fit": measure(fit_scores, fit_labels, threshold), "held_out": {}}
        for source, d in data.items():
            part = d["held_out"]
            share = NATURAL_QQP_DUPLICATE_SHARE if source == MAIN else None
            report["held_out"][source] = measure(scores[source][part], d["labels"][part], threshold, share)
        held = main["held_out"]
        if audit:
            report["held_out_by_qqp_labels"] = measure(scores[MAIN][held], main["duplicate"][held], threshold,
                                                       NATURAL_QQP_DUPLICATE_SHARE)
        report["target_met_on_held_out"] = report["held_out"][MAIN]["false_hit_share"] <= target
        report["curve"] = curve(scores[MAIN][held], main["labels"][held])
        rules[rule] = report
    verifier = rules["cosine+verifier"]
    verifier["min_similarity"] = MIN_SIMILARITY
    served = np.concatenate([d["scores"][verifier_scores[s] >= verifier["threshold_exact"]] for s, d in data.items()])
    # The verifier serves no pair far below this cosine on any set; the index is queried from a little
    # below it (fewer rows to score exactly: a faster lookup, and the same decisions on every pair here).
    lowest_served = float(served.min()) if len(served) else MIN_SIMILARITY
    verifier["lowest_cosine_served"] = round(lowest_served, 4)
    lookup_floor = max(MIN_SIMILARITY, math.floor(lowest_served * 100) / 100 - LOOKUP_MARGIN)
    return {"target_false_hit_share": target, "min_hits": min_hits, "holdout_percent": HOLDOUT_PERCENT,
            "labels": "panel where judged, else QQP" if audit else "QQP",
            "audit": _audit_summary(main, audit) if audit else None,
            "pairs": {s: {"fit": int((~d["held_out"]).sum()), "held_out": int(d["held_out"].sum())}
                      for s, d in data.items()},
            "rules": rules, "verifier_model": model | {"threshold": verifier["threshold_exact"],
                                                       "lookup_floor": round(lookup_floor, 4)}}


def plot(report: dict[str, Any], path: Path) -> None:
    """The held-out QQP precision–recall curve of each rule, with the chosen thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    for rule, r in report["rules"].items():
        c = r["curve"]
        axes.plot(c["recall"], c["precision"], label=f"{rule}")
        chosen = r["held_out"][MAIN]
        axes.plot([chosen["recall"]], [1 - chosen["false_hit_share"]], "o",
                  label=f"{rule} at {r['threshold']:.3f}: recall {chosen['recall']:.1%}, "
                        f"false hits {chosen['false_hit_share']:.2%}")
    axes.axhline(1 - report["target_false_hit_share"], color="grey", linestyle=":", label="target: 1% false hits")
    axes.set_xlabel("recall (duplicates served from the cache)")
    axes.set_ylabel("precision (1 − false-hit share)")
    axes.set_title(f"Semantic cache on held-out QQP pairs (labels: {report['labels']})")
    axes.set_ylim(0.5, 1.005)
    axes.legend(loc="lower left", fontsize=8)
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)

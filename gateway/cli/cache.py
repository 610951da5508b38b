"""`frugal cache calibrate`: the semantic cache's thresholds, from human-labelled paraphrase pairs
(docs/semantic-cache.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import echo_json, fail

app = typer.Typer(no_args_is_help=True, help="The response caches (docs/semantic-cache.md).")


@app.command("calibrate")
def cache_calibrate(
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding paraphrase/ (default: $FRUGAL_DATA_DIR, "
                                                       "else ../shared/data next to the repository)")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the full report (JSON) here")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the precision-recall plot (PNG) here")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="Reuse (and extend) embeddings saved in this .npz")]
    = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Read only the first N pairs of each source")] = None,
    audit: Annotated[bool, typer.Option(help="Use the panel's verdicts on QQP pairs (gateway/cache/calibration/"
                                             "qqp_audit.jsonl) where it has them; --no-audit: QQP's labels "
                                             "alone")] = True,
    verifier_out: Annotated[Path | None, typer.Option(help="Write the fitted match verifier (JSON) here; "
                                                            "gateway/cache/verifier.json is the shipped one")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Choose the semantic cache's similarity threshold (and the match verifier's) on held-out human-labelled
    paraphrase pairs."""
    import json

    from gateway.cache.calibration.calibrate import MAIN, calibrate, load_audit, paraphrase_dir
    from gateway.cache.calibration.calibrate import plot as draw
    from gateway.cache.calibration.verifier_fit import write_verifier
    from gateway.cache.embedder import Embedder, SavedEmbeddings

    folder = paraphrase_dir(data_dir)
    if not folder.is_dir():
        raise fail(f"no paraphrase pack at {folder}: set --data-dir or FRUGAL_DATA_DIR to the folder holding it")
    embedder = Embedder()
    embed = SavedEmbeddings(embeddings, embedder.embed_many) if embeddings else embedder.embed_many
    report = calibrate(folder, embed, audit=load_audit() if audit else None, limit=limit)
    model = report.pop("verifier_model")
    if verifier_out:
        write_verifier(model, verifier_out)
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    if plot:
        draw(report, plot)
    if as_json:
        echo_json(report | {"rules": {rule: {k: v for k, v in r.items() if k != "curve"}
                                       for rule, r in report["rules"].items()}})
        return
    typer.echo(f"labels: {report['labels']}")
    for rule, r in report["rules"].items():
        held = r["held_out"]
        kind = f" (verifier probability, on cosine ≥ {r['min_similarity']})" if "min_similarity" in r else ""
        typer.echo(f"{rule}: threshold {r['threshold']:.4f}{kind} (target on the fit part "
                   f"{'met' if r['target_met_on_fit'] else 'NOT met'}, lowest false-hit share there "
                   f"{r['lowest_false_hit_share_on_fit']:.2%}; on held-out {MAIN} "
                   f"{'met' if r['target_met_on_held_out'] else 'NOT met'})")
        rows = list(held.items())
        if "held_out_by_qqp_labels" in r:
            rows.insert(1, (f"{MAIN} (QQP's labels)", r["held_out_by_qqp_labels"]))
        for source, m in rows:
            natural = (f", {m['false_hit_share_at_base_rate']:.2%} at {m['base_rate']:.1%} duplicates"
                       if "base_rate" in m else "")
            typer.echo(f"  held-out {source:10} pairs {m['pairs']:5}  hits {m['hits']:5}  false-hit share "
                       f"{m['false_hit_share']:6.2%}{natural}  FPR {m['false_positive_rate']:.2%}  "
                       f"recall {m['recall']:.2%}" + ("  (main set)" if source == MAIN else ""))

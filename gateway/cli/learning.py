"""`frugal judge retrain`, `frugal cascade refit / rollback / versions`: learning from the ledger and the
artifact store's versions (docs/learning.md). Registered on the `judge` and `cascade` groups.

Exit codes of retrain and refit: 0 when the candidate was promoted (or `--dry-run` evaluated it), 3 when the
promotion rule refused it, 2 when nothing could be trained or compared (the error says why)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import echo_json, fail

#: The exit code of a candidate the promotion rule refused.
REFUSED = 3

ConfigOption = Annotated[Path | None, typer.Option("--config", help="The gateway's config file (default: "
                                                   "$FRUGAL_CONFIG, else the packaged default)")]
RouteOption = Annotated[str, typer.Option("--route", help="The cascade route, e.g. frugal/auto")]


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise fail(f"--since: not an ISO 8601 time: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _config(path: Path | None) -> Any:
    from gateway.settings import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise fail(str(exc)) from exc


def _report(outcome: Any, as_json: bool, dry_run: bool) -> None:
    body = outcome.to_json()
    if as_json:
        echo_json(body)
    else:
        decision = body["decision"]
        typer.echo(f"route {body['route']}, tier {body['tier']}: {body['kind']} from the ledger "
                   f"({body['data']['labelled']} labelled answers: {body['data']['train']} older to train, "
                   f"{body['data']['test']} newer to test; target false-accept {body['data']['target_false_accept']})")
        for name in ("current", "candidate"):
            figures = decision[name] or {}
            fa = figures.get("false_accept")
            typer.echo(f"  {name:9} false-accept {('-' if fa is None else f'{fa:.3f}'):>6}  accept share "
                       f"{figures.get('accept_share', 0):.3f}  ({figures.get('accepted', 0)} of "
                       f"{figures.get('labelled', 0)} held-out answers accepted)")
        typer.echo(f"  candidate: {body['candidate']}")
        verdict = "promoted" if body["promoted"] else ("would be promoted" if decision["promote"] else "refused")
        typer.echo(f"{verdict}: {decision['reason']}" + (f" -> {body['promoted']} is current" if body["promoted"]
                                                          else " (dry run)" if dry_run and decision["promote"] else ""))
    if not body["decision"]["promote"]:
        raise typer.Exit(REFUSED)


def _run(kind: str, config_path: Path | None, route: str, tier: str | None, since: str | None, test_share: float,
         min_test: int, dry_run: bool, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    from gateway.artifacts import ArtifactError
    from gateway.fit.retrain import RetrainError, refit_threshold, retrain_judge

    config = _config(config_path)
    work = retrain_judge if kind == "judge" else refit_threshold
    try:
        outcome = work(config, route, tier=tier, since=_since(since), test_share=test_share, min_test=min_test,
                       promote=not dry_run, **(extra or {}))
    except KeyError as exc:
        raise fail(f"--route: no route {route!r} in the configuration") from exc
    except (RetrainError, ArtifactError) as exc:
        raise fail(str(exc)) from exc
    _report(outcome, as_json, dry_run)


FromLedger = Annotated[bool, typer.Option("--from-ledger", help="Train on the labelled answers in the gateway's "
                                          "ledger (the only source for now)")]
Tier = Annotated[str | None, typer.Option(help="The judged tier's model (default: the first judged tier)")]
Since = Annotated[str | None, typer.Option(help="Only requests from this ISO 8601 time on")]
TestShare = Annotated[float, typer.Option(min=0.05, max=0.95, help="Newest share of the labelled answers held out "
                                          "to compare the candidate with the current artifact")]
MinTest = Annotated[int, typer.Option(min=1, help="Held-out labelled answers needed to decide at all")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Evaluate only; write nothing")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the report as JSON")]


def judge_retrain(from_ledger: FromLedger = False, route: RouteOption = "frugal/auto", config: ConfigOption = None,
                  tier: Tier = None, since: Since = None, test_share: TestShare = 0.3, min_test: MinTest = 30,
                  dry_run: DryRun = False, as_json: AsJson = False,
                  mix_outcomes: Annotated[Path | None, typer.Option(
                      help="Also train on the local model's graded answers to data pack queries: the folder "
                           "`frugal judge build` cached them in (with --data)")] = None,
                  data: Annotated[list[Path] | None, typer.Option(
                      help="Data pack files whose cached answers --mix-outcomes holds; repeat")] = None,
                  keep_candidate: Annotated[Path | None, typer.Option(
                      help="Also write the candidate judge to this folder, promoted or not")] = None) -> None:
    """Train a route's judge again on its labelled traffic (optionally mixed with the packs' graded answers);
    promote it only when it beats the current one on newer traffic (docs/learning.md, "The promotion rule")."""
    if not from_ledger:
        raise fail("give --from-ledger (the labelled traffic in the gateway's ledger is the only source for now)")
    packs = None
    if (mix_outcomes is None) != (not data):
        raise fail("--mix-outcomes and --data go together")
    if mix_outcomes is not None and data:
        from gateway.cache.embedder import Embedder
        from gateway.cli.common import read_grid
        from gateway.fit.retrain import PackOutcomes

        if not mix_outcomes.is_dir():
            raise fail(f"--mix-outcomes: no folder {mix_outcomes} (run `frugal judge build` to make one)")
        packs = PackOutcomes([read_grid(path) for path in data], mix_outcomes, Embedder().embed_many)
    _run("judge", config, route, tier, since, test_share, min_test, dry_run, as_json,
         {"packs": packs, "keep": keep_candidate})


def cascade_refit(from_ledger: FromLedger = False, route: RouteOption = "frugal/auto", config: ConfigOption = None,
                  tier: Tier = None, since: Since = None, test_share: TestShare = 0.3, min_test: MinTest = 30,
                  dry_run: DryRun = False, as_json: AsJson = False) -> None:
    """Choose a route's judged-tier threshold again on its labelled traffic (same judge); promote it only
    when it beats the current one."""
    if not from_ledger:
        raise fail("give --from-ledger (the labelled traffic in the gateway's ledger is the only source for now)")
    _run("threshold", config, route, tier, since, test_share, min_test, dry_run, as_json)


def cascade_rollback(route: RouteOption = "frugal/auto", config: ConfigOption = None) -> None:
    """Make the version before the current one current again; running gateways follow within
    artifacts.watch_interval_s (or use POST /admin/routes/rollback for at once)."""
    from gateway.artifacts import ArtifactError, ArtifactStore

    store = ArtifactStore(_config(config).artifacts.dir)
    previous = store.previous(route)
    if previous is None:
        raise fail(f"route {route!r} has no earlier version to roll back to")
    try:
        store.set_current(route, previous, "rollback (frugal cascade rollback)")
    except ArtifactError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"route {route}: {previous} is current")


def cascade_versions(route: RouteOption = "frugal/auto", config: ConfigOption = None,
                     as_json: AsJson = False) -> None:
    """A route's versions, the current one, and every change."""
    from gateway.artifacts import ArtifactStore

    store = ArtifactStore(_config(config).artifacts.dir)
    body = {"route": route, "current": store.current(route), "versions": store.versions(route),
            "history": store.history(route)}
    if as_json:
        echo_json(body)
        return
    typer.echo(f"route {route}: current {body['current']}; versions: {', '.join(body['versions']) or 'none'}")
    for entry in body["history"]:
        typer.echo(f"  {entry['at']}  {entry['version']:8} {entry['why']}")

"""One command per lifecycle step; the DVC stages call these. Heavy imports happen inside each command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from catdog.errors import CatdogError

app = typer.Typer(
    name="catdog",
    help="Cats-vs-Dogs MLOps pipeline: each command is one lifecycle step (and one DVC stage).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RootOption = typer.Option(None, "--root", help="Project root (default: the folder holding params.yaml).")


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@app.command()
def source(root: Path | None = RootOption) -> None:
    """Resolve the data source ($DATA_SOURCE or params.yaml) and write its fingerprint to data/source.json."""
    from catdog.stages.source import run

    run(root)


@app.command()
def ingest(root: Path | None = RootOption) -> None:
    """Acquire the raw dataset (URL, local zip or folder) into data/raw/PetImages/{Cat,Dog}."""
    from catdog.stages.ingest import run

    run(root)


@app.command()
def validate(root: Path | None = RootOption) -> None:
    """Decode every raw image, classify problems, quarantine unusable files, enforce thresholds."""
    from catdog.stages.validate import run

    run(root)


@app.command()
def prepare(root: Path | None = RootOption) -> None:
    """Resize usable images to squares and write the stratified, leak-free train/val/test split."""
    from catdog.stages.prepare import run

    run(root)


@app.command()
def train(root: Path | None = RootOption) -> None:
    """Fine-tune the classifier on data/processed; writes models/model.ckpt and metrics/train.json."""
    from catdog.stages.train import run

    run(root)


@app.command()
def baselines(root: Path | None = RootOption) -> None:
    """Train and score the linear probe and the from-scratch CNN the fine-tuned model is compared with."""
    from catdog.stages.baselines import run

    run(root)


@app.command()
def evaluate(root: Path | None = RootOption) -> None:
    """Test-split metrics, curves, calibration, behavioural checks; fails below params.yaml floors."""
    from catdog.stages.evaluate import run

    run(root)


@app.command()
def export(root: Path | None = RootOption) -> None:
    """ONNX export with a parity check, drift reference statistics and the model card (models/)."""
    from catdog.stages.export import run

    run(root)


@app.command()
def checks(root: Path | None = RootOption) -> None:
    """deepchecks suites (data integrity, train-test drift, model evaluation); fails on params.yaml gates."""
    from catdog.stages.checks import run

    run(root)


@app.command("drift-report")
def drift_report(
    root: Path | None = RootOption,
    url: str | None = typer.Option(None, "--url", help="The service, e.g. http://host:8000."),
    api_key: str | None = typer.Option(
        None, "--api-key", help="The service's admin key (default: $ADMIN_API_KEY)."
    ),
    window: Path | None = typer.Option(
        None, "--window", help="A saved window (JSON of GET /monitoring/window) instead of --url."
    ),
    save_window: Path | None = typer.Option(None, "--save-window", help="Also save the fetched window here."),
    out: Path | None = typer.Option(None, "--out", help="Report folder (default: reports/drift)."),
    min_images: int | None = typer.Option(
        None, "--min-images", help="Fewest window images (default: checks.min_samples)."
    ),
) -> None:
    """deepchecks drift of the service's recent inputs (GET /monitoring/window) vs the training split."""
    from catdog.drift_report import run

    run(root, url, api_key, window, out, save_window, min_images)


@app.command()
def register(root: Path | None = RootOption) -> None:
    """Register the exported model as a new version of the registered model (alias challenger)."""
    from catdog.config import Project
    from catdog.registry.promotion import register as register_model

    register_model(Project(root))


@app.command()
def promote(
    root: Path | None = RootOption,
    version: str | None = typer.Option(
        None, help="A registered version (default: @challenger; a rolled-back one only when named)."
    ),
) -> None:
    """Run the promotion gates on the challenger; all pass -> it becomes @champion (exit 3 otherwise).

    Holds the registry's lease (exit 75 while another promote or rollback holds it) and completes a move a
    killed promote or rollback left half done.
    """
    from catdog.config import Project
    from catdog.registry.promotion import promote as promote_model

    promote_model(Project(root), version)


@app.command()
def rollback(
    root: Path | None = RootOption,
    to: str | None = typer.Option(
        None, "--to", help="The version to roll back to (default: the newest older gated one, see @previous)."
    ),
    reason: str = typer.Option("manual rollback", help="Why, for the audit log."),
    expect_champion: str | None = typer.Option(
        None, "--expect-champion", help="Refuse (exit 2) unless @champion is this version."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the move; change nothing."),
) -> None:
    """Point @champion at the newest older version that passed the gates and was never rolled back from.

    The version left is tagged rolled_back=true: no later rollback or scheduled promotion returns to it.
    Holds the registry's lease (exit 75 while another promote or rollback holds it).
    """
    from catdog.config import Project
    from catdog.registry.promotion import rollback as rollback_model

    rollback_model(Project(root), to, reason, expect_champion, dry_run)


@app.command()
def audit(
    root: Path | None = RootOption,
    at: str | None = typer.Option(None, help="An ISO date/time: which version was @champion then."),
    as_json: bool = typer.Option(False, "--json", help="Print the log as JSON."),
) -> None:
    """The audit log of every alias move (register, promote, rollback), oldest first."""
    from datetime import UTC, datetime

    from catdog.config import Project
    from catdog.registry import audit as audit_log
    from catdog.registry.promotion import open_registry

    project = Project(root)
    registry = open_registry(project)
    rows = audit_log.history(project, registry)
    if at is not None:
        try:
            moment = datetime.fromisoformat(at)
        except ValueError as exc:
            raise CatdogError(f"--at {at!r} is not an ISO date/time (e.g. 2026-11-17T15:00)") from exc
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        version = audit_log.champion_at(rows, moment)
        print(f"{registry.name} @champion at {moment.isoformat()}: {version or 'none'}")
        return
    print(audit_log.as_json(rows) if as_json else audit_log.format_rows(rows))


@app.command()
def summary(root: Path | None = RootOption) -> None:
    """Print where the model, the metrics and the MLflow run of the latest pipeline run are."""
    from catdog.config import Project
    from catdog.summary import render

    print(render(Project(root)))


def run_cli(cli: typer.Typer) -> None:
    """Run a Typer CLI; a CatdogError becomes one clear message and its exit status (catdog.errors)."""
    try:
        cli()
    except CatdogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()

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
def summary(root: Path | None = RootOption) -> None:
    """Print where the model, the metrics and the MLflow run of the latest pipeline run are."""
    from catdog.config import Project
    from catdog.summary import render

    print(render(Project(root)))


def main() -> None:
    """Run the CLI; a CatdogError becomes one clear message and exit status 1, without a traceback."""
    try:
        app()
    except CatdogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

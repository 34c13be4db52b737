"""`python -m flows`: run the pipeline flow once, check the data trigger, or serve the deployments."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from catdog.cli import run_cli

app = typer.Typer(
    name="flows",
    help="The Prefect flow over the DVC pipeline (ephemeral local API unless PREFECT_API_URL is set).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
RootOption = typer.Option(None, "--root", help="Project root (default: the folder holding params.yaml).")
SourceOption = typer.Option(None, "--source", help="Data source for this run (URL, zip or folder).")


def _root(root: Path | None) -> Path:
    from catdog.config import find_root

    return root.resolve() if root else find_root()


@app.command()
def run(
    root: Path | None = RootOption,
    source: str | None = SourceOption,
    set_params: list[str] = typer.Option(
        [], "--set-param", "-S", help="key.path=value written to params.yaml."
    ),
    promote: bool = typer.Option(True, "--promote/--no-promote", help="Run the promotion gates at the end."),
    until: str | None = typer.Option(None, help="Stop after this stage (e.g. prepare)."),
) -> None:
    """Run the pipeline flow once; exit 0 when it ends Completed, 1 otherwise."""
    from flows import overrides
    from flows.pipeline import pipeline

    state = pipeline(
        root=str(_root(root)),
        source=source,
        params=overrides.parse(set_params),
        promote=promote,
        until=until,
        return_state=True,
    )
    print(f"flow run ended {state.name}: {state.message or ''}".rstrip(": "))
    sys.exit(0 if state.is_completed() else 1)


@app.command()
def watch(root: Path | None = RootOption, source: str | None = SourceOption) -> None:
    """Run the data-change trigger once: the pipeline runs only when the source changed."""
    from flows.data_trigger import data_watch

    state = data_watch(root=str(_root(root)), source=source, return_state=True)
    print(f"flow run ended {state.name}: {state.message or ''}".rstrip(": "))
    sys.exit(0 if state.is_completed() else 1)


@app.command()
def serve(root: Path | None = RootOption) -> None:
    """Register the weekly, data-change and manual deployments and run their flow runs until stopped."""
    from flows.deploy import serve as serve_deployments

    serve_deployments(_root(root))


def main() -> None:
    # Prefect gives its ephemeral API 20 s to start; a fresh PREFECT_HOME on two busy cores can need more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    run_cli(app)


if __name__ == "__main__":
    main()

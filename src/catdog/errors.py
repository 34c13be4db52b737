"""Exceptions with messages meant for the person running the pipeline."""

from pathlib import Path

# Exit statuses of `python -m catdog`; the Prefect flow retries a failed stage unless PERMANENT or GATE.
EXIT_FAILED = 1  # an unexpected error (a traceback): may be transient
EXIT_PERMANENT = 2  # CatdogError: config, input or state that retrying will not fix (and usage errors)
EXIT_GATE = 3  # QualityGateError: data or a model crossed a threshold
EXIT_TRANSIENT = 75  # TransientError (EX_TEMPFAIL): worth retrying later, e.g. a dropped download


class CatdogError(Exception):
    """A failure explained in one clear message (the CLI prints it without a traceback)."""

    exit_code = EXIT_PERMANENT


class ConfigError(CatdogError):
    """params.yaml or an environment setting is missing or invalid."""


class DataSourceError(CatdogError):
    """The data source cannot be read, downloaded or verified."""


class TransientError(DataSourceError):
    """A failure that may go away on its own: a network error that outlasted the stage's own retries."""

    exit_code = EXIT_TRANSIENT


class QualityGateError(CatdogError):
    """Data or a model crossed a threshold configured in params.yaml."""

    exit_code = EXIT_GATE


def raise_failed_gates(gates: dict[str, dict], what: str, report: Path) -> None:
    """Raise QualityGateError naming each failed gate of {name: {value, threshold, passed}}, if any."""
    failed = [
        f"{name} = {gate['value']:.4g} (limit {gate['threshold']})"
        if isinstance(gate["value"], float)
        else f"{name} = {gate['value']} (limit {gate['threshold']})"
        for name, gate in gates.items()
        if not gate["passed"]
    ]
    if failed:
        raise QualityGateError(f"{what} failed: {'; '.join(failed)}; see {report}")

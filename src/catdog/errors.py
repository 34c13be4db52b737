"""Exceptions with messages meant for the person running the pipeline."""

from pathlib import Path


class CatdogError(Exception):
    """A failure explained in one clear message (the CLI prints it without a traceback)."""


class ConfigError(CatdogError):
    """params.yaml or an environment setting is missing or invalid."""


class DataSourceError(CatdogError):
    """The data source cannot be read, downloaded or verified."""


class QualityGateError(CatdogError):
    """Data or a model crossed a threshold configured in params.yaml."""


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

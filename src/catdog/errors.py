"""Exceptions with messages meant for the person running the pipeline."""


class CatdogError(Exception):
    """A failure explained in one clear message (the CLI prints it without a traceback)."""


class ConfigError(CatdogError):
    """params.yaml or an environment setting is missing or invalid."""


class DataSourceError(CatdogError):
    """The data source cannot be read, downloaded or verified."""


class QualityGateError(CatdogError):
    """Data or a model crossed a threshold configured in params.yaml."""

"""The registered model in MLflow: versions, aliases, tags and downloads (local SQLite store or a server)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catdog.errors import CatdogError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Version:
    """A registered model version as the registry code uses it (the version number as a string)."""

    version: str
    run_id: str | None
    tags: dict[str, str]
    aliases: tuple[str, ...]

    @classmethod
    def of(cls, found: Any) -> Version:
        return cls(
            str(found.version), found.run_id or None, dict(found.tags or {}), tuple(found.aliases or ())
        )


class Registry:
    """One registered model of one MLflow tracking/registry store."""

    def __init__(self, tracking_uri: str, name: str) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.name = name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def uri(self, version: str) -> str:
        return f"models:/{self.name}/{version}"

    def alias_uri(self, alias: str) -> str:
        return f"models:/{self.name}@{alias}"

    def ensure_model(self) -> None:
        """Create the registered model on first use."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(
                self.name,
                description="Cats-vs-Dogs classifier (ONNX); aliases challenger / champion / previous.",
            )

    def register(self, model_uri: str, run_id: str | None, tags: dict[str, str]) -> Version:
        """A new version of the model logged at `model_uri` (MLflow resolves a models:/m-<id> source in the
        global store, so it is pointed at this one for the call)."""
        from catdog.tracking import store

        self.ensure_model()
        with store(self.tracking_uri):
            created = self.client.create_model_version(self.name, source=model_uri, run_id=run_id, tags=tags)
        return Version.of(created)

    def version(self, version: str) -> Version:
        from mlflow.exceptions import MlflowException

        try:
            return Version.of(self.client.get_model_version(self.name, str(version)))
        except MlflowException as exc:
            raise CatdogError(f"{self.name} has no version {version}") from exc

    def by_alias(self, alias: str) -> Version | None:
        """The version an alias points to, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return Version.of(self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException:
            return None

    def versions(self) -> list[Version]:
        """Every version of the model, with its tags."""
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return [Version.of(version) for version in found]

    def aliases(self) -> dict[str, str]:
        """alias -> version of the registered model."""
        from mlflow.exceptions import MlflowException

        try:
            return {
                alias: str(version)
                for alias, version in self.client.get_registered_model(self.name).aliases.items()
            }
        except MlflowException:
            return {}

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(version))

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, value)

    def download(self, version: str, target: Path) -> Path:
        """The version's model folder (model.onnx, extra_files/...) downloaded under `target`."""
        from mlflow.artifacts import download_artifacts

        from catdog.tracking import store

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        target.mkdir(parents=True, exist_ok=True)
        with store(self.tracking_uri):
            return Path(download_artifacts(artifact_uri=self.uri(version), dst_path=str(target)))

    def log_json(self, version: Version, data: dict[str, Any], artifact_file: str) -> None:
        """A JSON artifact on the version's run (the gate results live next to the model they judged)."""
        if version.run_id:
            self.client.log_dict(version.run_id, data, artifact_file)

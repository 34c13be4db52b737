"""The registered model in MLflow: versions, aliases, tags and downloads (local SQLite store or a server)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from catdog.errors import CatdogError

log = logging.getLogger(__name__)


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

    def register(self, model_uri: str, run_id: str | None, tags: dict[str, str]) -> Any:
        """A new version of the model logged at `model_uri`."""
        self.ensure_model()
        return self.client.create_model_version(self.name, source=model_uri, run_id=run_id, tags=tags)

    def version(self, version: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as exc:
            raise CatdogError(f"{self.name} has no version {version}") from exc

    def by_alias(self, alias: str) -> Any | None:
        """The version an alias points to, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def aliases(self) -> dict[str, str]:
        """alias -> version of the registered model."""
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(self.name).aliases)
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

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        target.mkdir(parents=True, exist_ok=True)
        return Path(
            download_artifacts(
                artifact_uri=self.uri(version), dst_path=str(target), tracking_uri=self.tracking_uri
            )
        )

    def log_json(self, version: Any, data: dict[str, Any], artifact_file: str) -> None:
        """A JSON artifact on the version's run (the gate results live next to the model they judged)."""
        if version.run_id:
            self.client.log_dict(version.run_id, data, artifact_file)

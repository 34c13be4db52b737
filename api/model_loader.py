"""Find, open and check an exported model: a local .onnx file or folder, or an MLflow model URI.

A model is usable only when it carries the export stage's metadata (labels, preprocessing) and has the
expected input and output tensors; anything else fails with a ModelLoadError that says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catdog import onnx_model
from catdog.preprocessing import PreprocessConfig

MLFLOW_SCHEMES = (
    "models:/",
    "runs:/",
    "mlflow-artifacts:/",
    "s3://",
    "gs://",
    "wasbs://",
    "http://",
    "https://",
)
REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")


class ModelLoadError(Exception):
    """The model at a URI cannot be served; the message says why."""


@dataclass(frozen=True)
class ModelBundle:
    """A loaded model with everything the service reports about it."""

    session: Any
    labels: tuple[str, ...]
    config: PreprocessConfig
    name: str
    version: str
    precision: str
    uri: str
    path: Path
    metadata: dict[str, str]
    metrics: dict[str, Any]
    card: str | None
    registry: dict[str, Any] | None = None
    loaded_at: float = field(default_factory=time.time)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) of a preprocessed batch."""
        return onnx_model.probabilities(self.session, batch)

    def lineage(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "data_version": meta.get("data_version"),
            "git_commit": meta.get("git_commit"),
            "git_dirty": onnx_model.metadata_json(meta, "git_dirty"),
        }


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(MLFLOW_SCHEMES)


def alias_version(uri: str) -> str | None:
    """The registry version a models:/name@alias URI points to now; None for any other URI."""
    match = REGISTERED.match(uri)
    if not match or not match["alias"]:
        return None
    registry = _registry_version(uri)
    return registry["version"] if registry else None


def _download(uri: str, cache_dir: str) -> Path:
    """An MLflow model's files in a local folder (the tracking server from $MLFLOW_TRACKING_URI)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from mlflow.artifacts import download_artifacts
    except ImportError as exc:
        raise ModelLoadError(f"{uri} is an MLflow URI but mlflow is not installed") from exc
    target = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="catdog-model-"))
    target.mkdir(parents=True, exist_ok=True)
    try:
        return Path(download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as exc:
        raise ModelLoadError(f"cannot download {uri} from MLflow: {_first_line(exc)}") from exc


def _registry_version(uri: str) -> dict[str, Any] | None:
    """Registered model name, version and aliases for models:/name/N or models:/name@alias URIs."""
    match = REGISTERED.match(uri)
    if not match:
        return None
    from mlflow import MlflowClient

    client = MlflowClient()
    name = match["name"]
    try:
        if match["alias"]:
            found = client.get_model_version_by_alias(name, match["alias"])
        else:
            found = client.get_model_version(name, match["version"])
    except Exception as exc:
        raise ModelLoadError(f"cannot resolve {uri} in the MLflow registry: {_first_line(exc)}") from exc
    return {"name": name, "version": str(found.version), "aliases": sorted(found.aliases or [])}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _local_folder(uri: str) -> Path:
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: {path} does not exist")
    return path


def _find(folder: Path, name: str) -> Path | None:
    """A model file in the folder itself or in MLflow's extra_files/ subfolder."""
    for candidate in (folder / name, folder / "extra_files" / name):
        if candidate.is_file():
            return candidate
    return None


def _choose_file(location: Path, precision: str) -> tuple[Path, str]:
    """The .onnx file to serve and its precision, following MODEL_PRECISION."""
    if location.is_file():
        fp32, folder = location, location.parent
    else:
        folder = location
        fp32 = _find(folder, onnx_model.FP32_FILE)
        if fp32 is None:
            raise ModelLoadError(f"no {onnx_model.FP32_FILE} in {folder}")
    if precision == "fp32" or fp32.name == onnx_model.INT8_FILE:
        return fp32, "int8" if fp32.name == onnx_model.INT8_FILE else "fp32"
    int8 = _find(folder, onnx_model.INT8_FILE)
    approved = int8 is not None and _int8_approved(int8)
    if precision == "int8":
        if int8 is None:
            raise ModelLoadError(f"MODEL_PRECISION=int8 but there is no {onnx_model.INT8_FILE} beside {fp32}")
        if not approved:
            raise ModelLoadError(
                f"MODEL_PRECISION=int8 but {int8} is not approved: it lost more test accuracy than the "
                "export stage allows (see its metrics); serve fp32"
            )
    return (int8, "int8") if approved and int8 is not None else (fp32, "fp32")


def _int8_approved(path: Path) -> bool:
    try:
        meta = onnx_model.metadata(onnx_model.session(path, threads=1))
    except Exception:
        return False
    return meta.get("int8_approved") == "true"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_contract(
    session: Any, meta: dict[str, str], path: Path
) -> tuple[tuple[str, ...], PreprocessConfig]:
    """Labels and preprocessing from the metadata; the tensors the service feeds and reads."""
    missing = [key for key in ("labels", "preprocessing") if key not in meta]
    if missing:
        raise ModelLoadError(f"{path} is not an exported catdog model: metadata lacks {', '.join(missing)}")
    try:
        labels = tuple(str(label) for label in json.loads(meta["labels"]))
        config = PreprocessConfig.from_json(meta["preprocessing"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path} has unreadable labels or preprocessing metadata: {exc}") from exc
    if len(labels) < 2:
        raise ModelLoadError(f"{path} lists {len(labels)} labels; a classifier needs at least 2")
    inputs = [node.name for node in session.get_inputs()]
    outputs = [node.name for node in session.get_outputs()]
    if onnx_model.INPUT_NAME not in inputs or onnx_model.OUTPUT_NAMES[0] not in outputs:
        raise ModelLoadError(
            f"{path} has inputs {inputs} and outputs {outputs}; expected input "
            f"{onnx_model.INPUT_NAME!r} and output {onnx_model.OUTPUT_NAMES[0]!r}"
        )
    return labels, config


def load(uri: str, precision: str = "auto", threads: int | None = None, cache_dir: str = "") -> ModelBundle:
    """Open the model at `uri` and check it can be served (not yet warmed up)."""
    uri = uri.strip()
    if not uri:
        raise ModelLoadError("no model URI given (set MODEL_URI)")
    registry = _registry_version(uri) if is_mlflow_uri(uri) else None
    location = _download(uri, cache_dir) if is_mlflow_uri(uri) else _local_folder(uri)
    path, chosen = _choose_file(location, precision)
    try:
        session = onnx_model.session(path, threads=threads)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a loadable ONNX model: {_first_line(exc)}") from exc
    meta = onnx_model.metadata(session)
    labels, config = _check_contract(session, meta, path)
    card = _find(location if location.is_dir() else location.parent, onnx_model.CARD_FILE)
    metrics = onnx_model.metadata_json(meta, "metrics", {}) or {}
    return ModelBundle(
        session=session,
        labels=labels,
        config=config,
        name=meta.get("model_name", path.stem),
        version=registry["version"] if registry else _file_digest(path)[:12],
        precision=chosen,
        uri=uri,
        path=path,
        metadata=meta,
        metrics=metrics if isinstance(metrics, dict) else {},
        card=card.read_text(errors="replace") if card else None,
        registry=registry,
    )

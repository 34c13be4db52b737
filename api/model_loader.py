"""Find, open and check an exported model: a local .onnx file or folder, or an MLflow model URI.

A model is usable only when it carries the export stage's metadata (labels, preprocessing) and has the
expected input and output tensors; anything else fails with a ModelLoadError that says why.

MLflow models whose files never change (a registry version, a run's artifacts) are downloaded into one
folder per model version under the cache folder (into a temporary folder renamed when complete, under a file
lock shared by the processes using the cache), so no file of one version is ever served with another;
`prune_cache` then removes every version but the served one, and nothing else in the folder. Other URIs
(s3://, https://, mlflow-artifacts:/ ...) may change behind the same name, so they are downloaded afresh on
every load. Without a cache folder, or for such URIs, the download is removed as soon as the model is loaded:
everything the service needs from the files (the session, the card, the reference statistics) is read by then.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from api.monitoring import Reference, load_reference
from catdog import onnx_model
from catdog.preprocessing import PreprocessConfig

log = logging.getLogger("catdog.api")

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
# What POST /admin/reload accepts besides paths: a registered version or alias, or a logged model id.
RELOADABLE_URI = re.compile(r"^models:/[A-Za-z0-9][\w.-]*(?:/\d+|@[\w-]+)?/?$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
CACHE_LOCK = ".lock"
PARTIAL_PREFIX = ".partial-"
# What `_cache_name` produces ("model" or "<name>-v<N>", cut to 80 characters, then 12 hex digits):
# prune_cache removes only these (and partial downloads), so a shared cache folder loses nothing else.
CACHE_ENTRY = re.compile(r"^(?:model|[A-Za-z0-9._-]*-v\d+|[A-Za-z0-9._-]{80})-[0-9a-f]{12}$")
# Sources whose files never change once written, so a cached copy stays valid: a run's artifacts.
IMMUTABLE = re.compile(r"^runs:/[0-9a-fA-F]+/")


class ModelLoadError(Exception):
    """The model at a URI cannot be served; the message says why."""


class UriNotAllowed(Exception):
    """POST /admin/reload may not load this URI (the message names no file or host)."""


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
    reference: Reference | None = None
    cache_entry: Path | None = None

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


def allowed_model_dir(setting: str, model_uri: str) -> Path | None:
    """The folder reloads may load paths from: MODEL_DIR_ALLOWED, else MODEL_URI's folder when it is a path
    (the folder holding a .onnx file), else none."""
    if setting.strip():
        return Path(setting.strip()).expanduser().resolve()
    uri = model_uri.strip()
    if not uri or (SCHEME.match(uri) and not uri.startswith("file://")):
        return None
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    return path.parent if path.suffix == ".onnx" or path.is_file() else path


def check_reload_uri(uri: str, allowed_dir: Path | None, model_uri: str) -> str:
    """The URI POST /admin/reload may load (a path resolved, links and `..` included), or UriNotAllowed:
    MODEL_URI itself, a models:/ registry URI, or a path inside `allowed_dir`. Nothing is read to decide, so
    the answer tells nothing about the file system."""
    uri = uri.strip()
    if uri == model_uri.strip() or RELOADABLE_URI.match(uri):
        return uri
    if SCHEME.match(uri) and not uri.startswith("file://"):
        raise UriNotAllowed(
            "only models:/ registry URIs (models:/name/version, models:/name@alias) and paths in the "
            "allowed model folder can be loaded"
        )
    if allowed_dir is None:
        raise UriNotAllowed("loading by path is off: set MODEL_DIR_ALLOWED to allow a model folder")
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    if not path.is_relative_to(allowed_dir):
        raise UriNotAllowed("the path is not inside the allowed model folder")
    return str(path)


def _download(uri: str, target: Path) -> Path:
    """An MLflow model's files in `target` (the tracking server from $MLFLOW_TRACKING_URI)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from mlflow.artifacts import download_artifacts
    except ImportError as exc:
        raise ModelLoadError(f"{uri} is an MLflow URI but mlflow is not installed") from exc
    try:
        return Path(download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as exc:
        raise ModelLoadError(f"cannot download {uri} from MLflow: {_first_line(exc)}") from exc


def _cache_name(source: str, registry: dict[str, Any] | None) -> str:
    """The folder of one model version: readable for registered versions, unique for any URI."""
    digest = hashlib.sha256(source.encode()).hexdigest()
    label = f"{registry['name']}-v{registry['version']}" if registry else "model"
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label)[:80]}-{digest[:12]}"


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Exclusive use of the cache folder across processes (workers sharing MODEL_CACHE_DIR)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / CACHE_LOCK).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _fetched(uri: str, registry: dict[str, Any] | None, cache_dir: str) -> Iterator[tuple[Path, Path | None]]:
    """(the model's local location, its cache folder or None) while the caller reads it."""
    # An alias is pinned to the version just resolved, so the files are that version's even if it moves.
    source = f"models:/{registry['name']}/{registry['version']}" if registry else uri
    if not cache_dir or not (registry or IMMUTABLE.match(uri)):
        with tempfile.TemporaryDirectory(prefix="catdog-model-") as temporary:
            yield _download(source, Path(temporary)), None
        return
    cache = Path(cache_dir).expanduser()
    with _cache_lock(cache):
        entry = cache / _cache_name(source, registry)
        if not entry.is_dir():
            partial = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=cache))
            try:
                _download(source, partial)
                partial.rename(entry)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
        yield _model_root(entry), entry


def _model_root(entry: Path) -> Path:
    """The folder holding the model file in a downloaded version (MLflow may nest it one level down)."""
    if _find(entry, onnx_model.FP32_FILE) is not None:
        return entry
    nested = [child for child in entry.iterdir() if child.is_dir() and _find(child, onnx_model.FP32_FILE)]
    return nested[0] if len(nested) == 1 else entry


def _is_cache_entry(child: Path) -> bool:
    """A folder the cache made: a version folder or a partial download (anything else is left alone)."""
    return child.is_dir() and (bool(CACHE_ENTRY.match(child.name)) or child.name.startswith(PARTIAL_PREFIX))


def prune_cache(cache_dir: str, keep: Path | None) -> None:
    """Remove every version folder and leftover partial download in the cache but `keep`. Best effort: a
    cache that cannot be locked or cleaned is logged, never raised (it must not hide a load's own outcome)."""
    cache = Path(cache_dir).expanduser()
    if not cache.is_dir():
        return
    try:
        with _cache_lock(cache):
            for child in cache.iterdir():
                if _is_cache_entry(child) and (keep is None or child.resolve() != keep.resolve()):
                    shutil.rmtree(child, ignore_errors=True)
                    log.info("model cache: removed %s", child.name)
    except OSError as exc:
        log.warning("model cache %s not pruned: %s", cache, _first_line(exc))


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
    if not is_mlflow_uri(uri):
        return _open(uri, _local_folder(uri), precision, threads)
    registry = _registry_version(uri)
    with _fetched(uri, registry, cache_dir) as (location, entry):
        return _open(uri, location, precision, threads, registry, entry)


def _open(
    uri: str,
    location: Path,
    precision: str,
    threads: int | None,
    registry: dict[str, Any] | None = None,
    entry: Path | None = None,
) -> ModelBundle:
    """Everything the service needs from the model's files, read now (the files may go afterwards)."""
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
        reference=load_reference(path),
        cache_entry=entry,
    )

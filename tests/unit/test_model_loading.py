"""Model loading around the model itself: the MLflow download cache (only immutable sources cached, only the
cache's own folders pruned, pruning best effort) and the predictor's load supervision (retries while no model
is served, an alias watcher that never dies, the readiness gauge computed from /ready's own answer)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from api import model_loader
from api.batching import InferenceFailed
from api.metrics import ServiceMetrics
from api.model_loader import ModelLoadError
from api.monitoring import DriftMonitor
from api.predictor import Predictor
from api.settings import Settings

BOUND = 20.0  # seconds any wait here may take before the test fails (nothing should come near it)


@pytest.fixture
def remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stands in for the remote store (S3, HTTP, MLflow cannot be reached here): `_download` copies this
    folder, so a test can change what the "same URI" serves."""
    source = tmp_path / "remote"
    source.mkdir()
    (source / "content").write_text("1")

    def download(uri: str, target: Path) -> Path:
        shutil.copytree(source, target, dirs_exist_ok=True)
        return target

    monkeypatch.setattr(model_loader, "_download", download)
    return source


def _fetch(uri: str, cache: Path, registry: dict | None = None) -> str:
    with model_loader._fetched(uri, registry, str(cache)) as (location, _entry):
        return (location / "content").read_text()


@pytest.mark.parametrize("uri", ["s3://bucket/models/latest", "https://host/model", "mlflow-artifacts:/1/m"])
def test_mutable_uris_are_downloaded_afresh_each_time(remote: Path, tmp_path: Path, uri: str) -> None:
    cache = tmp_path / "cache"
    assert _fetch(uri, cache) == "1"
    (remote / "content").write_text("2")
    assert _fetch(uri, cache) == "2"
    assert not cache.exists() or not [child for child in cache.iterdir() if child.is_dir()]


def test_registry_versions_and_runs_are_cached(remote: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    registry = {"name": "catdog", "version": "3", "aliases": []}
    run = "runs:/0123456789abcdef0123456789abcdef/model"
    assert _fetch("models:/catdog@prod", cache, registry) == "1"
    assert _fetch(run, cache) == "1"
    (remote / "content").write_text("2")
    assert _fetch("models:/catdog@prod", cache, registry) == "1"  # the same version: its files never change
    assert _fetch(run, cache) == "1"
    names = sorted(child.name for child in cache.iterdir() if child.is_dir())
    assert names == sorted(
        [model_loader._cache_name("models:/catdog/3", registry), model_loader._cache_name(run, None)]
    )


def test_prune_removes_only_the_caches_own_folders(tmp_path: Path) -> None:
    registry = {"name": "catdog", "version": "3", "aliases": []}
    served = tmp_path / model_loader._cache_name("models:/catdog/4", {**registry, "version": "4"})
    old = tmp_path / model_loader._cache_name("models:/catdog/3", registry)
    run = tmp_path / model_loader._cache_name("runs:/abc/model", None)
    partial = tmp_path / f"{model_loader.PARTIAL_PREFIX}x1y2"
    foreign = [tmp_path / "photos", tmp_path / "team-notes-0123456789ab", tmp_path / "model"]
    for folder in (served, old, run, partial, *foreign):
        folder.mkdir()
    (tmp_path / "readme.txt").write_text("keep me")
    model_loader.prune_cache(str(tmp_path), served)
    left = sorted(child.name for child in tmp_path.iterdir())
    assert left == sorted(
        [served.name, *(folder.name for folder in foreign), "readme.txt", model_loader.CACHE_LOCK]
    )


def test_a_cache_that_cannot_be_locked_is_not_pruned_and_nothing_raises(tmp_path: Path) -> None:
    # A folder where the lock file should be: opening it fails with an OSError, as an unwritable cache
    # folder does for a non-root user (these tests may run as root, where permissions do not stop it).
    (tmp_path / model_loader.CACHE_LOCK).mkdir()
    old = tmp_path / model_loader._cache_name("runs:/abc/model", None)
    old.mkdir()
    model_loader.prune_cache(str(tmp_path), None)
    assert old.is_dir()


def _predictor(tmp_path: Path, **settings: object) -> tuple[Predictor, ServiceMetrics]:
    config = Settings(model_uri=str(tmp_path / "missing.onnx"), model_poll_seconds=0, **settings)
    metrics = ServiceMetrics()
    return Predictor(config, metrics, DriftMonitor(config, metrics)), metrics


def _failed_loads(metrics: ServiceMetrics) -> float:
    return metrics.reloads.labels(outcome="failed")._value.get()


def test_a_failed_load_reports_its_own_error_when_the_cache_cannot_be_pruned(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / model_loader.CACHE_LOCK).mkdir(parents=True)
    predictor, _metrics = _predictor(tmp_path, model_cache_dir=str(cache))
    with pytest.raises(ModelLoadError, match="does not exist"):
        asyncio.run(predictor.reload(predictor.settings.model_uri, "auto"))


def test_the_configured_load_is_retried_while_no_model_is_served(tmp_path: Path) -> None:
    predictor, metrics = _predictor(tmp_path)
    predictor.retry_first_s, predictor.retry_max_s = 0.01, 0.02

    async def scenario() -> None:
        await predictor.start()
        try:
            async with asyncio.timeout(BOUND):
                while _failed_loads(metrics) < 3:
                    await asyncio.sleep(0.01)
            assert predictor._loading is not None and not predictor._loading.done()
            assert predictor.reason == "no model: load failed"
        finally:
            await predictor.stop()

    asyncio.run(scenario())


def test_a_failed_alias_version_is_tried_again_while_no_model_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor, metrics = _predictor(tmp_path)
    predictor.settings.model_uri = "models:/catdog@prod"
    monkeypatch.setattr(model_loader, "alias_version", lambda uri: "3")

    def mlflow_down(*args: object) -> None:
        raise ModelLoadError("cannot download models:/catdog/3 from MLflow: connection refused")

    monkeypatch.setattr(model_loader, "load", mlflow_down)

    async def scenario() -> None:
        await predictor.check_alias()
        await predictor.check_alias()

    asyncio.run(scenario())
    assert _failed_loads(metrics) == 2 and predictor._broken_version is None


def test_the_alias_watcher_survives_unexpected_errors(tmp_path: Path) -> None:
    predictor, _metrics = _predictor(tmp_path)
    predictor.settings.model_poll_seconds = 0.01
    calls = []

    async def broken() -> None:
        calls.append(1)
        raise PermissionError("cache not writable")

    predictor.check_alias = broken  # type: ignore[method-assign]

    async def scenario() -> bool:
        watcher = asyncio.get_running_loop().create_task(predictor._watch_alias())
        try:
            async with asyncio.timeout(BOUND):
                while len(calls) < 3:
                    await asyncio.sleep(0.01)
            return watcher.done()
        finally:
            watcher.cancel()

    assert asyncio.run(scenario()) is False


def test_the_ready_gauge_follows_readiness(tmp_path: Path) -> None:
    predictor, metrics = _predictor(tmp_path)
    predictor.bundle = object()  # type: ignore[assignment]
    gauge = metrics.ready

    def value() -> float:
        return next(iter(gauge.collect())).samples[0].value

    assert value() == 0.0  # a model but no inference loop: /ready answers 503

    class Failing:
        def predict(self, batch: object) -> None:
            raise RuntimeError("model exploded")

    async def scenario() -> tuple[float, float]:
        predictor.batcher.start()
        running = value()
        with pytest.raises(InferenceFailed):
            await predictor.batcher.predict(Failing(), np.zeros((3, 4, 4), np.float32))
        failing = value()
        await predictor.batcher.stop()
        return running, failing

    assert asyncio.run(scenario()) == (1.0, 0.0)

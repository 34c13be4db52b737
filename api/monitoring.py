"""Live data drift: image properties and confidence of recent predictions against the model's reference.

The export stage writes reference_stats.json beside the model: catdog.image_stats properties of training
images and the model's confidence on the validation split. For every prediction the service measures the
same properties on the model-sized picture (with the original width and height, as export does) in one
background thread, off the request path, and keeps the last DRIFT_WINDOW images. Each property's population
stability index (PSI) against its reference says whether live traffic still looks like the training data.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from api.metrics import ServiceMetrics
from api.settings import Settings
from catdog.image_stats import image_properties, population_stability_index
from catdog.onnx_model import REFERENCE_FILE

log = logging.getLogger("catdog.api")

PROPERTIES = ("brightness", "contrast", "sharpness", "colourfulness", "width", "height", "aspect_ratio")
CONFIDENCE = "confidence"
MONITORED = (*PROPERTIES, CONFIDENCE)
QUEUE_SIZE = 256
PUBLISH_EVERY = 32
REFERENCE_PER_BIN = 75

Reference = dict[str, dict[str, Any]]


def load_reference(model_path: Path) -> Reference | None:
    """Reference statistics per monitored name from the reference_stats.json beside the model file (or in
    MLflow's extra_files/); None when it is absent or unreadable (drift is then not monitored)."""
    folder = model_path.parent
    path = next(
        (p for p in (folder / REFERENCE_FILE, folder / "extra_files" / REFERENCE_FILE) if p.is_file()), None
    )
    if path is None:
        log.warning("no %s beside %s: drift is not monitored for this model", REFERENCE_FILE, model_path)
        return None
    try:
        stats = json.loads(path.read_text())
        found = {name: stats["images"]["properties"].get(name) for name in PROPERTIES}
        found[CONFIDENCE] = stats.get("predictions", {}).get("statistics", {}).get(CONFIDENCE)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("unreadable %s (%s): drift is not monitored for this model", path, exc)
        return None
    return {name: ref for name, ref in found.items() if isinstance(ref, dict) and ref.get("histogram")}


def coarsen(histogram: Mapping[str, Any], bins: int) -> dict[str, list[float]]:
    """The histogram with adjacent bins merged into at most `bins` of about equal reference mass, none
    holding less than half a bin's share (an almost empty bin makes PSI jump on a handful of images)."""
    edges = [float(edge) for edge in histogram["edges"]]
    counts = np.asarray(histogram["counts"], dtype=np.float64)
    cumulative = np.cumsum(counts) / max(counts.sum(), 1.0)
    ends = np.unique(np.searchsorted(cumulative, np.arange(1, bins) / bins - 1e-9))
    starts = [0, *(int(end) + 1 for end in ends if end < len(counts) - 1)]
    merged = list(np.add.reduceat(counts, starts)) if len(counts) else []
    kept = [edges[start] for start in starts] + [edges[-1]]
    while len(merged) > 1:
        small = [i for i, count in enumerate(merged) if count < 0.5 * sum(merged) / bins]
        if not small:
            break
        low = max(small[0] - 1, 0)
        merged[low : low + 2] = [merged[low] + merged[low + 1]]
        del kept[low + 1]
    return {"edges": kept, "counts": [float(count) for count in merged]}


def bin_count(reference: Mapping[str, Any], most: int) -> int:
    """Bins PSI uses for one reference: at most `most`, each holding at least REFERENCE_PER_BIN reference
    values. The confidence reference (about 300 validation images) gets 4: with 6 or more, held-out test
    photos scored PSI up to 0.22-0.27 against it, a false alarm, as the bins split hairs near 1.0."""
    return max(2, min(most, int(reference.get("count", 0)) // REFERENCE_PER_BIN))


def _summary(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    return {"mean": float(values.mean()), "median": float(np.median(values))}


class DriftDetector:
    """A rolling window of per-image values, each monitored name judged against its reference by PSI."""

    def __init__(
        self, reference: Reference, window: int, min_images: int, threshold: float, bins: int
    ) -> None:
        self.reference = {
            name: {**stats, "histogram": coarsen(stats["histogram"], bin_count(stats, bins))}
            for name, stats in reference.items()
        }
        self.window, self.min_images, self.threshold = window, min_images, threshold
        self._rows: deque[tuple[float, ...]] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, values: Mapping[str, float]) -> None:
        """One image's properties (and confidence); names it lacks count as missing."""
        self._rows.append(tuple(float(values.get(name, math.nan)) for name in MONITORED))

    def rows(self) -> list[dict[str, float | None]]:
        """The window's per-image values, oldest first (missing values as None)."""
        return [
            {name: (v if math.isfinite(v) else None) for name, v in zip(MONITORED, row, strict=True)}
            for row in self._rows
        ]

    def report(self) -> dict[str, Any]:
        """The window, each name's PSI, verdict and reference/live summaries, and the overall verdict."""
        live = np.asarray(self._rows, dtype=np.float64).reshape(-1, len(MONITORED))
        judged = len(live) >= self.min_images
        properties = {name: self._judge(name, live[:, i], judged) for i, name in enumerate(MONITORED)}
        drifted = [name for name, result in properties.items() if result["drifted"]]
        status = ("drift" if drifted else "ok") if judged else "collecting"
        return {
            "status": status,
            "drifted": bool(drifted),
            "drifted_properties": drifted,
            "window": self.window,
            "images": len(live),
            "min_images": self.min_images,
            "threshold": self.threshold,
            "properties": properties,
        }

    def _judge(self, name: str, column: np.ndarray, judged: bool) -> dict[str, Any]:
        values = column[np.isfinite(column)]
        reference = self.reference.get(name)
        result: dict[str, Any] = {
            "score": None,
            "threshold": self.threshold,
            "drifted": False,
            "status": "no_reference" if reference is None else "collecting",
            "bins": None,
            "reference": None,
            "live": _summary(values),
        }
        if reference is None:
            return result
        result["bins"] = len(reference["histogram"]["counts"])
        result["reference"] = {
            "mean": reference.get("mean"),
            "median": reference.get("quantiles", {}).get("p50"),
        }
        score = population_stability_index(reference, values) if judged and values.size else math.nan
        if math.isfinite(score):
            drifted = bool(score > self.threshold)
            result.update(score=score, drifted=drifted, status="drift" if drifted else "ok")
        return result


@dataclass(frozen=True)
class Observation:
    """What the worker needs to measure one predicted image."""

    version: str
    picture: Image.Image
    original_size: tuple[int, int]
    confidence: float


class DriftMonitor:
    """The served model's drift window, fed by a background thread and published as Prometheus gauges."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._queue: queue.Queue[Observation | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._version: str | None = None
        self._reference: Reference | None = None
        self._detector: DriftDetector | None = None
        self._unpublished = 0
        self._publish(self._report())

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="drift-monitor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def use_model(self, version: str, reference: Reference | None) -> None:
        """Judge the window against a newly served model's reference: a new model starts an empty window
        (reloading the same model with the same reference keeps it)."""
        with self._lock:
            if version == self._version and reference == self._reference:
                return
            self._version, self._reference = version, reference
            self._detector = (
                DriftDetector(
                    reference,
                    self.settings.drift_window,
                    self.settings.drift_min_images,
                    self.settings.drift_psi_threshold,
                    self.settings.drift_bins,
                )
                if reference
                else None
            )
            self._publish(self._report())
        log.info("drift window reset", extra={"model_version": version, "reference": sorted(reference or {})})

    def observe(
        self, version: str, picture: Image.Image, original_size: tuple[int, int], confidence: float
    ) -> None:
        """Queue one predicted image for the window; never blocks (dropped, and counted, when behind)."""
        if self._detector is None or version != self._version:
            return
        try:
            self._queue.put_nowait(Observation(version, picture, original_size, confidence))
        except queue.Full:
            self.metrics.monitoring_dropped.labels(monitor="drift").inc()

    def report(self) -> dict[str, Any]:
        """The current drift report (the gauges are updated with it)."""
        with self._lock:
            report = self._report()
            self._publish(report)
        return report

    def window(self) -> dict[str, Any]:
        """The properties (and confidence) of the images in the window: numbers only, no pixels, no names."""
        with self._lock:
            rows = self._detector.rows() if self._detector is not None else []
            return {
                "model_version": self._version,
                "window": self.settings.drift_window,
                "images": len(rows),
                "properties": list(MONITORED),
                "rows": rows,
            }

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                values = {**image_properties(item.picture, item.original_size), CONFIDENCE: item.confidence}
            except Exception:
                log.exception("drift monitor: cannot measure an image")
                continue
            with self._lock:
                if self._detector is None or item.version != self._version:
                    continue
                self._detector.add(values)
                self._unpublished += 1
                if self._queue.empty() or self._unpublished >= PUBLISH_EVERY:
                    self._publish(self._report())

    def _report(self) -> dict[str, Any]:
        if self._detector is not None:
            return {"model_version": self._version, **self._detector.report()}
        threshold = self.settings.drift_psi_threshold
        unjudged = {
            "score": None,
            "threshold": threshold,
            "drifted": False,
            "status": "no_reference",
            "bins": None,
        }
        return {
            "model_version": self._version,
            "status": "no_model" if self._version is None else "no_reference",
            "drifted": False,
            "drifted_properties": [],
            "window": self.settings.drift_window,
            "images": 0,
            "min_images": self.settings.drift_min_images,
            "threshold": threshold,
            "properties": {name: {**unjudged, "reference": None, "live": None} for name in MONITORED},
        }

    def _publish(self, report: Mapping[str, Any]) -> None:
        self._unpublished = 0
        self.metrics.drift_window.set(report["images"])
        for name in MONITORED:
            result = report["properties"].get(name) or {}
            score = result.get("score")
            self.metrics.drift_score.labels(property=name).set(math.nan if score is None else score)
            self.metrics.drift_detected.labels(property=name).set(int(bool(result.get("drifted"))))

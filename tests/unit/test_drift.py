"""The service's drift detector on real photos: quiet on held-out photos of the reference's distribution,
loud on darkened, grayscale and rotated ones; and the monitor's window, reset and gauges."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from api.metrics import ServiceMetrics
from api.monitoring import CONFIDENCE, MONITORED, PROPERTIES, DriftDetector, DriftMonitor, coarsen
from api.settings import Settings
from catdog.image_stats import describe, image_properties, reference_statistics
from catdog.preprocessing import ImageDecodeError, decode, open_image

SIZE = 224
REFERENCE_IMAGES = 1000
HELD_OUT = 1000
SHIFTED = 400
WINDOW = 200
THRESHOLD = 0.2
BINS = 10

SHIFTS = {
    "darkened": (lambda p: ImageEnhance.Brightness(p).enhance(0.5), False, {"brightness"}),
    "grayscale": (lambda p: p.convert("L").convert("RGB"), False, {"colourfulness"}),
    "rotated": (lambda p: p.transpose(Image.Transpose.ROTATE_90), True, {"aspect_ratio"}),
}


def measure(path: Path, shifts: bool) -> dict[str, dict[str, float]] | None:
    """Properties of a photo as the service measures them (model-sized picture, original size), and of
    its shifted versions when asked; None for a photo that does not decode."""
    try:
        picture = decode(path, size=SIZE)
        width, height = open_image(path).size
    except ImageDecodeError:
        return None
    rows = {"original": image_properties(picture, (width, height))}
    for name, (shift, turned, _) in SHIFTS.items() if shifts else ():
        rows[name] = image_properties(shift(picture), (height, width) if turned else (width, height))
    return rows


@pytest.fixture(scope="module")
def photos_measured(sample_images_dir: Path) -> dict[str, list[dict[str, dict[str, float]]]]:
    """Disjoint seeded random reference and held-out sets of real cat and dog photos, measured (the first
    SHIFTED held-out photos also darkened, grayscale and rotated)."""
    files = sorted((sample_images_dir / "PetImages").glob("*/*.jpg"))
    random.Random(0).shuffle(files)
    started = time.perf_counter()
    reference: list[dict[str, dict[str, float]]] = []
    held_out: list[dict[str, dict[str, float]]] = []
    for path in files:
        if len(held_out) == HELD_OUT:
            break
        target = reference if len(reference) < REFERENCE_IMAGES else held_out
        row = measure(path, shifts=target is held_out and len(held_out) < SHIFTED)
        if row is not None:
            target.append(row)
    if len(held_out) < HELD_OUT:
        pytest.skip(f"the photo sample has too few photos: {REFERENCE_IMAGES + HELD_OUT} needed")
    seconds = time.perf_counter() - started
    print(
        f"\nmeasured {REFERENCE_IMAGES + HELD_OUT} photos ({SHIFTED} also shifted 3 ways) in {seconds:.1f}s"
    )
    return {"reference": reference, "held_out": held_out}


def judge(reference_rows: list[dict[str, float]], live_rows: list[dict[str, float]]) -> dict:
    """The detector's report on a full window of `live_rows` against a reference built from other rows."""
    found = DriftDetector(
        reference_statistics(reference_rows), len(live_rows), len(live_rows), THRESHOLD, BINS
    )
    for row in live_rows:
        found.add(row)
    return found.report()


def test_held_out_photos_are_not_flagged(photos_measured) -> None:
    reference = [row["original"] for row in photos_measured["reference"]]
    held_out = [row["original"] for row in photos_measured["held_out"]]
    rates = {}
    for size in (100, WINDOW, 500):
        found = [judge(reference, held_out[i : i + size]) for i in range(0, len(held_out) - size + 1, 100)]
        alarms = [report["drifted_properties"] for report in found if report["drifted"]]
        rates[size] = len(alarms) / len(found)
        highest = {name: round(max(r["properties"][name]["score"] for r in found), 3) for name in PROPERTIES}
        print(
            f"\nrolling windows of {size} (stride 100): false-alarm rate {rates[size]:.0%} of {len(found)} "
            f"windows {alarms or ''}; highest PSI per property {highest}"
        )
        assert all(report["status"] in ("ok", "drift") for report in found)
    assert rates[WINDOW] == rates[500] == 0


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_shifted_photos_are_flagged(photos_measured, shift: str) -> None:
    reference = [row["original"] for row in photos_measured["reference"]]
    shifted = [row[shift] for row in photos_measured["held_out"][:SHIFTED]]
    expected = SHIFTS[shift][2]
    found = [judge(reference, shifted[i : i + WINDOW]) for i in range(0, SHIFTED, WINDOW)]
    scores = [round(min(r["properties"][name]["score"] for name in expected), 2) for r in found]
    print(f"\n{shift}: PSI of {sorted(expected)} over {len(found)} windows of {WINDOW}: {scores}")
    for report in found:
        assert report["drifted"] and report["status"] == "drift"
        assert expected <= set(report["drifted_properties"])


def test_confidence_drift() -> None:
    rng = np.random.default_rng(0)
    reference = {CONFIDENCE: describe(0.5 + 0.5 * rng.beta(8, 1, size=1000))}
    same = 0.5 + 0.5 * rng.beta(8, 1, size=100)
    unsure = 0.5 + 0.5 * rng.beta(2, 2, size=100)
    reports = []
    for values in (same, unsure):
        found = DriftDetector(reference, 100, 100, THRESHOLD, BINS)
        for value in values:
            found.add({CONFIDENCE: float(value)})
        reports.append(found.report())
    assert reports[0]["drifted"] is False and reports[1]["drifted_properties"] == [CONFIDENCE]
    assert (
        reports[1]["properties"][CONFIDENCE]["live"]["mean"]
        < reports[0]["properties"][CONFIDENCE]["live"]["mean"]
    )
    assert reports[0]["properties"]["brightness"]["status"] == "no_reference"


def test_too_few_images_are_not_judged() -> None:
    reference = {"brightness": describe(np.linspace(0.2, 0.8, 200))}
    found = DriftDetector(reference, window=50, min_images=20, threshold=THRESHOLD, bins=BINS)
    for _ in range(19):
        found.add({"brightness": 0.01})
    report = found.report()
    assert report["status"] == "collecting" and report["properties"]["brightness"]["score"] is None
    for _ in range(100):
        found.add({"brightness": 0.01})
    report = found.report()
    assert report["images"] == 50 and report["drifted_properties"] == ["brightness"]


def test_coarsen_keeps_the_mass_in_few_balanced_bins() -> None:
    values = np.concatenate([np.full(600, 500.0), np.linspace(100, 800, 400), [2000.0] * 3])
    histogram = describe(values)["histogram"]
    merged = coarsen(histogram, BINS)
    assert sum(merged["counts"]) == sum(histogram["counts"])
    assert len(merged["counts"]) <= BINS and len(merged["edges"]) == len(merged["counts"]) + 1
    assert min(merged["counts"]) >= 0.5 * sum(merged["counts"]) / BINS
    assert merged["edges"][0] == histogram["edges"][0] and merged["edges"][-1] == histogram["edges"][-1]
    even = coarsen({"edges": list(range(21)), "counts": [5] * 20}, BINS)
    assert even == {"edges": [float(e) for e in range(0, 21, 2)], "counts": [10.0] * 10}


def gauge(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


def test_monitor_window_reset_and_gauges(photos_measured) -> None:
    reference = reference_statistics([row["original"] for row in photos_measured["reference"]])
    settings = Settings(drift_window=20, drift_min_images=10, feedback_db="")
    metrics = ServiceMetrics()
    monitor = DriftMonitor(settings, metrics)
    assert monitor.report()["status"] == "no_model"
    assert all(math.isnan(gauge(metrics, "catdog_drift_score", property=name)) for name in MONITORED)
    picture = Image.new("RGB", (SIZE, SIZE), (20, 20, 20))
    monitor.start()
    try:
        monitor.use_model("v1", reference)
        monitor.observe("v0", picture, (640, 480), 0.9)
        for _ in range(12):
            monitor.observe("v1", picture, (640, 480), 0.9)
        deadline = time.monotonic() + 10
        while monitor.report()["images"] < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        report = monitor.report()
        assert report["images"] == 12 and report["model_version"] == "v1"
        assert "brightness" in report["drifted_properties"]
        assert report["properties"][CONFIDENCE]["status"] == "no_reference"
        assert gauge(metrics, "catdog_drift_window_images") == 12
        assert gauge(metrics, "catdog_drift_detected", property="brightness") == 1
        assert gauge(metrics, "catdog_drift_score", property="brightness") > THRESHOLD
        assert math.isnan(gauge(metrics, "catdog_drift_score", property=CONFIDENCE))
        monitor.use_model("v1", reference)
        assert monitor.report()["images"] == 12
        monitor.use_model("v2", reference)
        assert monitor.report()["images"] == 0 and gauge(metrics, "catdog_drift_window_images") == 0
        assert gauge(metrics, "catdog_drift_detected", property="brightness") == 0
        monitor.use_model("v3", None)
        assert monitor.report()["status"] == "no_reference"
    finally:
        monitor.stop()

"""DVC stage `checks`: deepchecks suites before deployment, on one row of image properties per image.

The table: split and label from data/processed/manifest.csv, brightness/contrast/sharpness/colourfulness of
the processed picture (catdog.image_stats, in parallel), width/height/aspect ratio of the original (from
reports/validation_images.csv when present, else of the processed picture), and the evaluation's test
probabilities (reports/evaluate/predictions.csv). catdog.checks runs the suites; this stage writes
reports/checks/{<suite>.html,summary.json} and metrics/checks.json, logs them to the pipeline's MLflow run and
fails (exit 3) when a condition configured in params.yaml `checks` fails.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image

from catdog import tracking
from catdog.config import Project
from catdog.errors import CatdogError, QualityGateError
from catdog.image_stats import image_properties
from catdog.stages.prepare import read_manifest

log = logging.getLogger(__name__)
SIZE_PROPERTIES = ("width", "height", "aspect_ratio")


def _properties(job: tuple[str, tuple[int, int] | None]) -> dict[str, float]:
    path, original = job
    with Image.open(path) as img:
        return image_properties(img, original)


def original_sizes(validation_images: Path) -> dict[str, tuple[int, int]]:
    """Raw path -> (width, height) from the validation stage's per-image CSV (empty when absent)."""
    if not validation_images.is_file():
        return {}
    with validation_images.open(newline="") as handle:
        return {
            row["path"]: (int(row["width"]), int(row["height"]))
            for row in csv.DictReader(handle)
            if row.get("width") and row.get("height") and int(row["height"]) > 0
        }


def property_table(project: Project) -> pd.DataFrame:
    """One row per image of the manifest: path, split, label, image properties and p_<class> (test rows)."""
    paths = project.paths
    rows = read_manifest(paths.split_manifest)
    if not rows:
        raise CatdogError(f"{paths.split_manifest} lists no images; run the prepare stage first")
    sizes = original_sizes(paths.validation_images)
    jobs = [(str(paths.processed / row["path"]), sizes.get(row.get("source") or "")) for row in rows]
    workers = min(project.params.checks.workers, max(1, len(jobs) // 64))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            props = list(pool.map(_properties, jobs, chunksize=64))
    else:
        props = [_properties(job) for job in jobs]
    table = pd.DataFrame(
        [{k: row[k] for k in ("path", "split", "label")} | p for row, p in zip(rows, props, strict=True)]
    )
    predictions = paths.evaluate_reports / "predictions.csv"
    if predictions.is_file():
        scored = pd.read_csv(predictions)
        proba = [c for c in scored.columns if c.startswith("p_")]
        table = table.merge(scored[["path", *proba]], on="path", how="left")
    else:
        log.warning("%s not found: the model evaluation suite is skipped", predictions)
    return table


def counts(outcomes: list[dict]) -> dict:
    """metrics/checks.json: passed/failed conditions per suite, gates and all, and the checks that errored."""
    result: dict = {"passed": True, "suites": {}}
    for suite in outcomes:
        conditions = [c for check in suite["checks"] for c in check["conditions"]]
        gates = [c for c in conditions if c["gate"]]
        entry = {
            "checks": len(suite["checks"]),
            "checks_not_run": sum("error" in check for check in suite["checks"]),
            "conditions_passed": sum(c["passed"] for c in conditions),
            "conditions_failed": sum(not c["passed"] for c in conditions),
            "gates_passed": sum(c["passed"] for c in gates),
            "gates_failed": sum(not c["passed"] for c in gates),
        }
        result["suites"][suite["suite"]] = entry
        result["passed"] = result["passed"] and entry["gates_failed"] == 0
    return result


def failed_gates(outcomes: list[dict]) -> list[str]:
    return [
        f"{suite['suite']}/{check['check']}: {c['name']} ({' '.join(str(c['details']).split())})"
        for suite in outcomes
        for check in suite["checks"]
        for c in check["conditions"]
        if c["gate"] and not c["passed"]
    ]


def run(root: Path | None = None) -> dict:
    """Run the suites, write the reports, summary and metrics, log them to MLflow, fail on a failed gate."""
    from catdog import checks

    project = Project(root)
    paths, params = project.paths, project.params.checks
    started = time.perf_counter()
    table = property_table(project)
    computed = time.perf_counter()
    proba = [c for c in table.columns if c.startswith("p_")]
    outcomes = checks.run_suites(table, proba, params, paths.checks_reports)
    metrics = counts(outcomes) | {
        "images": len(table),
        "seconds": {
            "properties": round(computed - started, 2),
            "suites": round(time.perf_counter() - computed, 2),
        },
    }
    summary = {"params": params.model_dump(), "features": list(checks.FEATURES), "suites": outcomes}
    paths.checks_summary.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths.metrics.mkdir(parents=True, exist_ok=True)
    paths.checks_metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    log_to_mlflow(project)
    log.info(
        "checks on %d images in %.1f s: %s",
        len(table),
        time.perf_counter() - started,
        ", ".join(f"{k} {v['gates_failed']} gate(s) failed" for k, v in metrics["suites"].items()),
    )
    if failed := failed_gates(outcomes):
        raise QualityGateError(
            f"deepchecks conditions failed: {'; '.join(failed)}; see {paths.checks_reports}"
        )
    return metrics


def log_to_mlflow(project: Project) -> None:
    """The HTML reports, summary and metrics as artifacts of the pipeline's MLflow run (when there is one)."""
    paths = project.paths
    if not paths.run_info.is_file():
        log.info("%s not found: reports not logged to MLflow", paths.run_info)
        return
    with tracking.resume_pipeline_run(project):
        tracking.log_metrics(json.loads(paths.checks_metrics.read_text()), "checks/")
        tracking.log_files([paths.checks_reports, paths.checks_metrics], "checks")

"""`catdog drift-report`: deepchecks drift of the service's recent production inputs vs the training data.

The service keeps the per-image properties of its last DRIFT_WINDOW predicted images (never the pictures) and
serves them at GET /monitoring/window when MONITORING_EXPOSE_WINDOW is true (admin key required). This
command fetches that window (or reads one saved earlier), builds the reference table from the training split
with the checks stage's own table code (catdog.stages.checks.property_table), and runs deepchecks
FeatureDrift through catdog.checks: reports in --out (drift_report.html, confidence_drift.html when the
evaluation's test predictions give a per-image reference confidence, summary.json). Exit 3 when a property's
drift score is over params.yaml checks.max_feature_drift.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd

from catdog.config import Project
from catdog.errors import CatdogError, QualityGateError

log = logging.getLogger(__name__)

WINDOW_ROUTE = "/monitoring/window"
API_KEY_ENV = "ADMIN_API_KEY"
SIZE_PROPERTIES = ("width", "height", "aspect_ratio")


def fetch_window(url: str, api_key: str | None, timeout: float = 30.0) -> dict[str, Any]:
    """GET <url>/monitoring/window with the admin key; every failure is a CatdogError saying what to do."""
    target = url.rstrip("/") + WINDOW_ROUTE
    request = urllib.request.Request(target, headers={"Accept": "application/json"})
    if api_key:
        request.add_header("X-API-Key", api_key)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        if exc.code == 404:
            raise CatdogError(
                f"{target} answered 404 ({message}): the service does not expose its drift window; start it "
                "with MONITORING_EXPOSE_WINDOW=true (and ADMIN_API_KEY)"
            ) from exc
        if exc.code in (401, 403):
            raise CatdogError(
                f"{target} answered {exc.code} ({message}): pass the service's admin key with --api-key or "
                f"${API_KEY_ENV}"
            ) from exc
        raise CatdogError(f"{target} answered {exc.code}: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CatdogError(f"cannot reach the service at {url} ({reason}); check --url") from exc
    except ValueError as exc:
        raise CatdogError(f"{target} did not answer JSON: {exc}") from exc


def read_window(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CatdogError(f"cannot read the window file {path}: {exc}") from exc


def window_table(window: dict[str, Any]) -> pd.DataFrame:
    """One row per production image: the window's properties (and confidence) as floats."""
    try:
        names, rows = list(window["properties"]), list(window["rows"])
        table = pd.DataFrame(rows, columns=names).astype("float64")
    except (KeyError, TypeError, ValueError) as exc:
        raise CatdogError(
            f"the window is not the shape GET {WINDOW_ROUTE} answers (properties, rows): {exc}"
        ) from exc
    return table


def reference_tables(project: Project) -> tuple[pd.DataFrame, list[str], pd.Series | None, list[str]]:
    """The training split's property table, the properties to compare, the evaluation's per-image test
    confidence (None without predictions) and the properties left out (with why, logged)."""
    from catdog import checks
    from catdog.stages.checks import original_sizes, property_table
    from catdog.stages.prepare import read_manifest

    table = property_table(project)
    train = table[table["split"] == "train"]
    if train.empty:
        raise CatdogError(f"{project.paths.split_manifest} has no train images; run the prepare stage first")
    features, skipped = list(checks.FEATURES), []
    sizes = original_sizes(project.paths.validation_images)
    if not any((row.get("source") or "") in sizes for row in read_manifest(project.paths.split_manifest)):
        # Without the originals' sizes the table holds the processed squares: no basis for production sizes.
        skipped = [name for name in features if name in SIZE_PROPERTIES]
        features = [name for name in features if name not in SIZE_PROPERTIES]
        log.warning(
            "%s gives no original image sizes: %s not compared", project.paths.validation_images, skipped
        )
    proba = [c for c in table.columns if c.startswith("p_")]
    confidence = None
    if proba:
        scored = table[table["split"] == "test"].dropna(subset=proba)
        if len(scored) >= project.params.checks.min_samples:
            confidence = scored[proba].max(axis=1)
    return train, features, confidence, skipped


def run(
    root: Path | None,
    url: str | None,
    api_key: str | None,
    window_file: Path | None,
    out: Path | None,
    save_window: Path | None = None,
    min_images: int | None = None,
) -> dict[str, Any]:
    """Build the drift report and summary; print one verdict per property; QualityGateError on drift."""
    from catdog import checks

    project = Project(root)
    params = project.params.checks
    if window_file is None and not url:
        raise CatdogError("give the service's --url (or a saved --window FILE.json)")
    if window_file is not None:
        window, source = read_window(window_file), str(window_file)
    else:
        assert url is not None
        window, source = fetch_window(url, api_key or os.environ.get(API_KEY_ENV) or None), url
        if save_window is not None:
            save_window.parent.mkdir(parents=True, exist_ok=True)
            save_window.write_text(json.dumps(window, indent=2) + "\n")
    current = window_table(window)
    least = min_images if min_images is not None else params.min_samples
    if len(current) < least:
        raise CatdogError(
            f"the window from {source} holds {len(current)} image(s), fewer than the {least} needed "
            "(checks.min_samples or --min-images); let the service predict more images first"
        )
    reference, features, confidence, skipped = reference_tables(project)
    features = [name for name in features if name in current and current[name].notna().any()]
    if confidence is None or "confidence" not in current:
        confidence = None
    out_dir = out or project.root / "reports" / "drift"
    result = checks.run_drift(reference, current, features, params, out_dir, confidence)
    properties = result["properties"]
    for name in skipped:
        properties[name] = {"score": None, "skipped": "no original image sizes in the training data"}
    if confidence is None:
        properties["confidence"] = {"score": None, "skipped": "no per-image reference confidence"}
    drifted = [name for name, entry in properties.items() if entry.get("drifted")]
    summary = {
        "source": source,
        "model_version": window.get("model_version"),
        "images": len(current),
        "reference_images": len(reference),
        "threshold": params.max_feature_drift,
        "drifted": bool(drifted),
        "drifted_properties": drifted,
        "properties": properties,
        "reports": result["reports"],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, entry in properties.items():
        if entry.get("skipped"):
            print(f"{name}: skipped ({entry['skipped']})")
        elif entry["score"] is None:
            print(f"{name}: not computed (too few values)")
        else:
            verdict, sign = ("DRIFT", ">") if entry["drifted"] else ("ok", "<=")
            print(f"{name}: {verdict} ({entry['method']} {entry['score']:.3f} {sign} {entry['threshold']})")
    if drifted:
        raise QualityGateError(
            f"drift in {', '.join(drifted)} over {len(current)} production images vs "
            f"{len(reference)} training images; see {out_dir}"
        )
    print(f"no drift over {len(current)} production images; report in {out_dir}")
    return summary

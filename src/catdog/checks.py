"""The one module that imports deepchecks: its tabular suites on a table of per-image properties.

deepchecks' vision module needs the [vision] extra (pytorch-ignite and more), so the pictures are described by
catdog.image_stats properties (one row per image) and checked with deepchecks.tabular; the model suite takes
the evaluation's pre-computed probabilities, so no model object is needed. Replace this module to change
the tool: the stage only needs `run_suites` and `FEATURES`, `catdog drift-report` only `run_drift`.

Only the conditions configured in params.yaml (`checks`) are gates; deepchecks' own default conditions on the
other checks are reported (gate false) and never fail the stage.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from catdog.config import ChecksParams

log = logging.getLogger(__name__)

FEATURES: tuple[str, ...] = (
    "brightness",
    "contrast",
    "sharpness",
    "colourfulness",
    "width",
    "height",
    "aspect_ratio",
)
# Checks of deepchecks' default suites that cannot run here (no dates, no index column, no model object,
# a single dataset with predictions) or are too slow for the stage (MultivariateDrift trains a domain
# classifier: ~15 s even on 120 rows).
SKIPPED = {
    "DateTrainTestLeakageDuplicates",
    "DateTrainTestLeakageOverlap",
    "IndexTrainTestLeakage",
    "MultivariateDrift",
}


@contextmanager
def _quiet_and_compatible() -> Iterator[None]:
    """deepchecks 0.19 still calls DataFrame.applymap (removed in pandas 3): alias it to .map for the run."""
    added = not hasattr(pd.DataFrame, "applymap")
    if added:
        pd.DataFrame.applymap = pd.DataFrame.map  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if added:
            del pd.DataFrame.applymap  # type: ignore[attr-defined]


def _brier_at_most(limit: float) -> Callable[[Any], Any]:
    def condition(result: dict) -> Any:
        from deepchecks.core import ConditionCategory, ConditionResult

        worst = max(float(v) for v in result.values()) if result else math.nan
        passed = bool(worst <= limit)
        return ConditionResult(
            ConditionCategory.PASS if passed else ConditionCategory.FAIL, f"Brier score {worst:.4f}"
        )

    return condition


def _gated(check: Any) -> Any:
    check.clean_conditions()
    check.gate = True  # our marker: its conditions come from params.yaml
    return check


def _data_integrity(params: ChecksParams) -> Any:
    from deepchecks.tabular import checks, suites

    suite = suites.data_integrity()
    for key, check in list(suite.checks.items()):
        if isinstance(check, checks.DataDuplicates):
            suite.checks[key] = _gated(check).add_condition_ratio_less_or_equal(params.max_duplicates)
    return suite


def _train_test_validation(params: ChecksParams) -> Any:
    from deepchecks.tabular import checks, suites

    suite = suites.train_test_validation()
    for key, check in list(suite.checks.items()):
        if type(check).__name__ in SKIPPED:
            del suite.checks[key]
        elif isinstance(check, checks.FeatureDrift | checks.LabelDrift):
            new = type(check)(min_samples=params.min_samples)
            if isinstance(check, checks.FeatureDrift):
                suite.checks[key] = _gated(new).add_condition_drift_score_less_than(
                    max_allowed_categorical_score=params.max_feature_drift,
                    max_allowed_numeric_score=params.max_feature_drift,
                )
            else:
                suite.checks[key] = _gated(new).add_condition_drift_score_less_than(params.max_label_drift)
        elif isinstance(check, checks.TrainTestSamplesMix):
            suite.checks[key] = _gated(check).add_condition_duplicates_ratio_less_or_equal(
                params.max_duplicates_across_splits
            )
    return suite


def _model_evaluation(params: ChecksParams) -> Any:
    from deepchecks.tabular import Suite, checks

    performance = _gated(checks.SingleDatasetPerformance(scorers=["recall_per_class", "f1_per_class"]))
    if params.min_class_recall > 0:  # 0 = no floor (deepchecks' condition is a strict "greater than")
        performance.add_condition_greater_than(params.min_class_recall, metrics=["recall"])
    if params.min_class_f1 > 0:
        performance.add_condition_greater_than(params.min_class_f1, metrics=["f1"])
    calibration = _gated(checks.CalibrationScore())
    calibration.add_condition(
        f"Brier score <= {params.max_brier_score}", _brier_at_most(params.max_brier_score)
    )
    return Suite(
        "Model Evaluation Suite (test split, the evaluation's predictions)",
        performance,
        checks.RocReport(),
        checks.ConfusionMatrixReport(),
        checks.WeakSegmentsPerformance(),
        calibration,
    )


def _dataset(table: pd.DataFrame) -> Any:
    from deepchecks.tabular import Dataset

    return Dataset(
        table[[*FEATURES, "label"]].reset_index(drop=True),
        label="label",
        cat_features=[],
        label_type="binary",
    )


def _outcome(suite: str, result: Any, gated: set[str], report: Path) -> dict[str, Any]:
    """Every check of a suite: its conditions (passed, category, details, gate) or why it did not run."""
    entries = []
    for check in result.results:
        name = type(check.check).__name__
        entry: dict[str, Any] = {"check": name, "header": check.get_header(), "gate": name in gated}
        if hasattr(check, "exception"):
            entry["error"] = str(check.exception)
            entry["conditions"] = []
        else:
            entry["conditions"] = [
                {
                    "name": c.name,
                    "category": c.category.name,
                    "passed": c.is_pass(),
                    "details": c.details,
                    "gate": name in gated,
                }
                for c in check.conditions_results
            ]
        entries.append(entry)
    return {"suite": suite, "name": result.name, "report": str(report), "checks": entries}


def run_suites(
    table: pd.DataFrame, proba_columns: list[str], params: ChecksParams, out_dir: Path
) -> list[dict[str, Any]]:
    """The data integrity (all splits), train-test validation (train vs test) and model evaluation (test rows
    with probabilities) suites; each saved as out_dir/<suite>.html. Returns one summary per suite."""
    with _quiet_and_compatible():
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("*.html"):  # save_as_html never overwrites: it would write "name (1).html"
            stale.unlink()
        runs: list[tuple[str, Any, Callable[[Any], Any]]] = []
        train, test = table[table["split"] == "train"], table[table["split"] == "test"]
        runs.append(("data_integrity", _data_integrity(params), lambda s: s.run(_dataset(table))))
        runs.append(
            (
                "train_test_validation",
                _train_test_validation(params),
                lambda s: s.run(_dataset(train), _dataset(test)),
            )
        )
        scored = test.dropna(subset=proba_columns)
        if len(scored):
            proba = scored[proba_columns].to_numpy(dtype=np.float64)
            classes = [c.removeprefix("p_") for c in proba_columns]
            predicted = np.asarray(classes)[proba.argmax(axis=1)]
            runs.append(
                (
                    "model_evaluation",
                    _model_evaluation(params),
                    lambda s: s.run(
                        _dataset(scored),
                        y_pred_train=predicted,
                        y_proba_train=proba,
                        model_classes=classes,
                        run_single_dataset="Train",
                    ),
                )
            )
        outcomes = []
        for name, suite, execute in runs:
            gated = {type(c).__name__ for c in suite.checks.values() if getattr(c, "gate", False)}
            result = execute(suite)
            report = out_dir / f"{name}.html"
            result.save_as_html(str(report), as_widget=False)
            outcomes.append(_outcome(name, result, gated, report))
        return outcomes


def _feature_drift(
    reference: pd.DataFrame, current: pd.DataFrame, columns: list[str], params: ChecksParams
) -> Any:
    from deepchecks.tabular import Dataset, checks

    check = checks.FeatureDrift(min_samples=params.min_samples, n_top_columns=len(columns))
    check.add_condition_drift_score_less_than(
        max_allowed_categorical_score=params.max_feature_drift,
        max_allowed_numeric_score=params.max_feature_drift,
    )

    def dataset(table: pd.DataFrame) -> Any:
        return Dataset(table[columns].astype("float64").reset_index(drop=True), cat_features=[])

    return check.run(dataset(reference), dataset(current))


def run_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    features: list[str],
    params: ChecksParams,
    out_dir: Path,
    confidence_reference: pd.Series | None = None,
) -> dict[str, Any]:
    """deepchecks FeatureDrift (Kolmogorov-Smirnov) of each of `features`, `reference` rows (the training
    images) vs `current` rows (production images), saved as out_dir/drift_report.html; and, given a per-image
    reference confidence (the evaluation's test predictions), the same check on the model's confidence, saved
    as out_dir/confidence_drift.html. Returns {"reports": [...], "properties": {name: {"score", "method",
    "threshold", "drifted"}}}; a property drifted when its score is over params.max_feature_drift."""
    runs: list[tuple[str, pd.DataFrame, pd.DataFrame, list[str]]] = [
        ("drift_report", reference, current, features)
    ]
    if confidence_reference is not None and "confidence" in current:
        runs.append(
            (
                "confidence_drift",
                pd.DataFrame({"confidence": confidence_reference.dropna().to_numpy()}),
                current[["confidence"]].dropna(),
                ["confidence"],
            )
        )
    with _quiet_and_compatible():
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, *_ in runs:
            (out_dir / f"{name}.html").unlink(missing_ok=True)  # save_as_html never overwrites
        properties: dict[str, dict[str, Any]] = {}
        reports = []
        for name, ref, cur, columns in runs:
            result = _feature_drift(ref, cur, columns, params)
            report = out_dir / f"{name}.html"
            result.save_as_html(str(report), as_widget=False)
            reports.append(str(report))
            for column in columns:
                value = result.value.get(column) or {}
                score = value.get("Drift score")
                score = float(score) if score is not None and math.isfinite(float(score)) else None
                properties[column] = {
                    "score": score,
                    "method": value.get("Method"),
                    "threshold": params.max_feature_drift,
                    "drifted": score is not None and score > params.max_feature_drift,
                }
    return {"reports": reports, "properties": properties}

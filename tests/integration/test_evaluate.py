"""The evaluate stage on a model trained on real photos: metrics, plots, behavioural checks, floors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from catdog.errors import QualityGateError
from catdog.preprocessing import preprocess
from catdog.stages import evaluate
from catdog.training.checkpoint import load_classifier, predict_proba

pytestmark = pytest.mark.slow


def set_params(root, **evaluate_params):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"].update(evaluate_params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_evaluate_writes_metrics_plots_and_figures(trained_copy):
    set_params(trained_copy, min_accuracy=0.0, min_f1=0.0, max_log_loss=100.0)
    result = evaluate.run(trained_copy)
    saved = json.loads((trained_copy / "metrics" / "evaluate.json").read_text())
    assert saved["passed"] is True and saved["images"] == 8
    assert set(saved["test"]) == {"accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "ece"}
    assert sum(map(sum, saved["confusion_matrix"]["matrix"])) == 8
    assert saved["confusion_matrix"]["labels"] == ["cat", "dog"]
    for rate in saved["behaviour"].values():
        assert 0.0 <= rate <= 1.0
    assert result["test"] == saved["test"]
    figures = trained_copy / "reports" / "evaluate"
    for name in ("roc", "precision_recall", "confusion_matrix", "calibration", "worst_misclassified"):
        assert (figures / f"{name}.png").stat().st_size > 1000
    plot_data = trained_copy / "plots" / "evaluate"
    with (plot_data / "confusion.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and {r["actual"] for r in rows} == {"cat", "dog"}
    assert (plot_data / "roc.csv").read_text().startswith("fpr,tpr,threshold")


def test_predictions_match_the_shared_preprocessing_path(trained_copy):
    set_params(trained_copy, min_accuracy=0.0, min_f1=0.0, max_log_loss=100.0)
    evaluate.run(trained_copy)
    with (trained_copy / "reports" / "evaluate" / "predictions.csv").open() as handle:
        first = next(csv.DictReader(handle))
    model, config, _ = load_classifier(trained_copy / "models" / "model.ckpt")
    image = torch.from_numpy(preprocess(trained_copy / "data" / "processed" / first["path"], config))
    proba = predict_proba(model, image[None]).numpy()[0]
    np.testing.assert_allclose(proba, [float(first["p_cat"]), float(first["p_dog"])], atol=1e-6)


def test_a_floor_that_is_not_met_fails_the_stage_after_writing_metrics(trained_copy):
    set_params(trained_copy, max_log_loss=1e-9)
    with pytest.raises(QualityGateError, match="max_log_loss"):
        evaluate.run(trained_copy)
    saved = json.loads((trained_copy / "metrics" / "evaluate.json").read_text())
    assert saved["passed"] is False and saved["gates"]["max_log_loss"]["passed"] is False

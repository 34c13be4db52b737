"""Evaluation metrics against values computed by hand on a fixed set of predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from catdog.metrics import (
    classification_metrics,
    confusion,
    expected_calibration_error,
    pr_points,
    roc_points,
)

# 6 images: true labels and P(dog). Predictions: [0, 0, 1, 1, 1, 0] -> TP=2, FP=1, FN=1, TN=2.
Y = np.array([0, 0, 0, 1, 1, 1])
P_DOG = np.array([0.1, 0.4, 0.7, 0.8, 0.9, 0.3])
PROBA = np.stack([1 - P_DOG, P_DOG], axis=1)


def test_metrics_match_hand_computed_values():
    m = classification_metrics(Y, PROBA)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # positives {0.8, 0.9, 0.3} vs negatives {0.1, 0.4, 0.7}: 7 of 9 pairs ranked right.
    assert m["roc_auc"] == pytest.approx(7 / 9)
    expected_log_loss = -np.mean(np.log([0.9, 0.6, 0.3, 0.8, 0.9, 0.3]))
    assert m["log_loss"] == pytest.approx(expected_log_loss)


def test_ece_by_hand():
    # confidences 0.9, 0.6, 0.7, 0.8, 0.9, 0.7; correct 1, 1, 0, 1, 1, 0; 15 equal bins of width 1/15.
    # bins: (0.533,0.6]: {0.6 ok} -> |1-0.6|; (0.667,0.733]: {0.7 x, 0.7 x} -> |0-0.7|;
    #       (0.733,0.8]: {0.8 ok} -> |1-0.8|; (0.867,0.933]: {0.9 ok, 0.9 ok} -> |1-0.9|
    expected = (1 * 0.4 + 2 * 0.7 + 1 * 0.2 + 2 * 0.1) / 6
    assert expected_calibration_error(Y, PROBA) == pytest.approx(expected)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(np.array([0, 1]), perfect) == pytest.approx(0.0)


def test_confusion_and_curves():
    assert confusion(Y, PROBA) == [[2, 1], [1, 2]]
    roc = roc_points(Y, PROBA)
    assert roc[0]["fpr"] == 0.0 and roc[-1]["tpr"] == 1.0
    pr = pr_points(Y, PROBA)
    assert all(0.0 <= p["precision"] <= 1.0 for p in pr)


def test_single_class_auc_is_nan_not_an_error():
    m = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]]))
    assert math.isnan(m["roc_auc"]) and m["accuracy"] == 1.0

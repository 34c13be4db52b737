"""Classification metrics on predicted probabilities (NumPy + scikit-learn; no torch)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def calibration_bins(y_true: np.ndarray, proba: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Per non-empty equal-width bin of top-class confidence: count, mean confidence and accuracy."""
    confidence = np.asarray(proba).max(axis=1)
    correct = (np.asarray(proba).argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [
        {
            "lower": float(edges[b]),
            "upper": float(edges[b + 1]),
            "count": int((which == b).sum()),
            "confidence": float(confidence[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence over equal-width bins: sum_b |B|/n * |acc(B) - conf(B)|."""
    n = len(y_true)
    return float(
        sum(
            b["count"] / n * abs(b["accuracy"] - b["confidence"])
            for b in calibration_bins(y_true, proba, bins)
        )
    )


def _renormalised(proba: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    clipped = np.clip(np.asarray(proba, dtype=np.float64), eps, 1.0)
    return clipped / clipped.sum(axis=1, keepdims=True)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (class 1 positive), ROC-AUC, log loss and ECE."""
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    y_pred = proba.argmax(axis=1)
    both = len(np.unique(y_true)) == 2
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, proba[:, 1])) if both else float("nan"),
        "log_loss": float(skm.log_loss(y_true, _renormalised(proba), labels=[0, 1])),
        "ece": expected_calibration_error(y_true, proba),
    }


def confusion(y_true: np.ndarray, proba: np.ndarray) -> list[list[int]]:
    """Rows are true classes, columns predicted classes."""
    return skm.confusion_matrix(y_true, np.asarray(proba).argmax(axis=1), labels=[0, 1]).tolist()


def roc_points(y_true: np.ndarray, proba: np.ndarray) -> list[dict[str, float]]:
    fpr, tpr, thresholds = skm.roc_curve(y_true, np.asarray(proba)[:, 1])
    return [
        {"fpr": float(f), "tpr": float(t), "threshold": float(min(th, 1.0))}
        for f, t, th in zip(fpr, tpr, thresholds, strict=True)
    ]


def pr_points(y_true: np.ndarray, proba: np.ndarray) -> list[dict[str, float]]:
    precision, recall, _ = skm.precision_recall_curve(y_true, np.asarray(proba)[:, 1])
    return [{"recall": float(r), "precision": float(p)} for p, r in zip(precision, recall, strict=True)]

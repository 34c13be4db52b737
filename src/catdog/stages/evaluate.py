"""DVC stage `evaluate`: test-split metrics, curves, calibration, behavioural checks and quality floors.

Writes metrics/evaluate.json (DVC metrics), plots/evaluate/*.csv (DVC plots data), PNG figures and a
gallery of the worst misclassifications under reports/evaluate/, and fails when a floor in params.yaml
(evaluate.min_accuracy, min_f1, max_log_loss) is not met, so a bad model never reaches the registry.

For backbones with an ImageNet head it also measures the out-of-distribution score (catdog.ood, the same
function as the exported graph's `pet_score`): the threshold calibrated on the validation split as the export
stage does (export.ood), and the share of real test pets and of real non-pet pictures (the bundled
skimage.data images of catdog.ood.SKIMAGE_NON_PETS) it flags.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from catdog import metrics, ood, plots, preprocessing, tracking
from catdog.config import EvaluateParams, Project
from catdog.errors import raise_failed_gates
from catdog.inference import Transform, image_batches, predict_paths
from catdog.stages import baselines
from catdog.stages.prepare import load_split
from catdog.training.checkpoint import load_classifier, read_checkpoint

log = logging.getLogger(__name__)


def center_crop(fraction: float) -> Transform:
    def crop(img: Image.Image) -> Image.Image:
        w, h = img.size
        dw, dh = int(w * (1 - fraction) / 2), int(h * (1 - fraction) / 2)
        return img.crop((dw, dh, w - dw, h - dh))

    return crop


def corner_crop(fraction: float) -> Transform:
    def crop(img: Image.Image) -> Image.Image:
        w, h = img.size
        return img.crop((0, 0, int(w * fraction), int(h * fraction)))

    return crop


def behaviour(
    model: torch.nn.Module,
    paths: Sequence[Path],
    base: np.ndarray,
    config: preprocessing.PreprocessConfig,
    params: EvaluateParams,
) -> dict[str, float]:
    """Share of predictions unchanged by a horizontal flip and by small crops (behavioural tests)."""
    label = base.argmax(axis=1)
    checks: dict[str, Transform] = {
        "flip_stability": ImageOps.mirror,
        "center_crop_stability": center_crop(params.crop_fraction),
        "corner_crop_stability": corner_crop(params.crop_fraction),
    }
    rates = {}
    for name, transform in checks.items():
        changed = predict_paths(model, paths, config, params.batch_size, transform)
        rates[name] = float((changed.argmax(axis=1) == label).mean()) if len(label) else float("nan")
    return rates


def write_csv(rows: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)


def worst_errors(
    paths: Sequence[Path], y: np.ndarray, proba: np.ndarray, names: Sequence[str], k: int
) -> list[tuple[Path, str]]:
    """The k misclassified images the model was most confident about, with captions."""
    wrong = np.nonzero(proba.argmax(axis=1) != y)[0]
    order = wrong[np.argsort(-proba[wrong].max(axis=1))][:k]
    return [
        (
            paths[i],
            f"{paths[i].name}\ntrue {names[y[i]]}, said {names[proba[i].argmax()]} {proba[i].max():.2f}",
        )
        for i in order
    ]


def gates(test: dict[str, float], params: EvaluateParams) -> dict[str, dict]:
    checks = {
        "min_accuracy": (test["accuracy"], params.min_accuracy, test["accuracy"] >= params.min_accuracy),
        "min_f1": (test["f1"], params.min_f1, test["f1"] >= params.min_f1),
        "max_log_loss": (test["log_loss"], params.max_log_loss, test["log_loss"] <= params.max_log_loss),
    }
    return {k: {"value": v, "threshold": t, "passed": bool(ok)} for k, (v, t, ok) in checks.items()}


def run(root: Path | None = None) -> dict:
    """Evaluate models/model.ckpt on the test split, write metrics, plots and figures, enforce the floors."""
    project = Project(root)
    paths, params = project.paths, project.params.evaluate
    model, config, names = load_classifier(paths.model_checkpoint)
    model_name = str(read_checkpoint(paths.model_checkpoint)["hyper_parameters"]["model_name"])
    head = ood.imagenet_head(model_name) if project.params.export.ood.enabled else None
    test_paths, y = load_split(paths.processed, "test", names)
    if head is None:
        proba, test_scores = predict_paths(model, test_paths, config, params.batch_size), None
    else:
        proba, test_scores = ood.probabilities_and_scores(
            model, head, image_batches(test_paths, config, params.batch_size)
        )
    test = metrics.classification_metrics(y, proba)

    subset = list(range(len(test_paths)))
    if params.behaviour_images is not None and len(subset) > params.behaviour_images:
        subset = sorted(random.Random(project.params.seed).sample(subset, params.behaviour_images))
    rates = behaviour(model, [test_paths[i] for i in subset], proba[subset], config, params)

    matrix = metrics.confusion(y, proba)
    result = {
        "test": test,
        "behaviour": rates,
        "confusion_matrix": {"labels": list(names), "matrix": matrix},
        "images": len(test_paths),
        "gates": gates(test, params),
        "ood": out_of_distribution(project, model, head, config, test_scores, names),
    }
    result["passed"] = all(g["passed"] for g in result["gates"].values())
    result["comparison"] = compare(test, baselines.load_results(paths.baselines_metrics))
    write_outputs(project, result, test_paths, y, proba, names)
    log_to_mlflow(project, result)
    log.info(
        "test on %d images: %s; behaviour: %s",
        len(test_paths),
        ", ".join(f"{k} {v:.4f}" for k, v in test.items()),
        ", ".join(f"{k} {v:.3f}" for k, v in rates.items()),
    )
    raise_failed_gates(result["gates"], "model evaluation", paths.evaluate_metrics)
    return result


def out_of_distribution(
    project: Project,
    model: torch.nn.Module,
    head: torch.nn.Module | None,
    config: preprocessing.PreprocessConfig,
    test_scores: np.ndarray | None,
    names: list[str],
) -> dict:
    """Flagged shares of real pets (test split) and real non-pets (skimage.data) at the threshold calibrated
    on the validation split, as the export stage calibrates it."""
    if head is None or test_scores is None:
        return {"enabled": False}
    params, batch = project.params.export.ood, project.params.evaluate.batch_size
    val_paths, _ = load_split(project.paths.processed, "val", names)
    _, val_scores = ood.probabilities_and_scores(model, head, image_batches(val_paths, config, batch))
    threshold = ood.calibrate_threshold(
        val_scores, params.pet_quantile, params.min_threshold, params.max_threshold
    )
    pictures = ood.skimage_non_pets()
    with tempfile.TemporaryDirectory(prefix="catdog-ood-") as folder:
        files = ood.save_pictures(pictures, Path(folder))
        _, non_pet = ood.probabilities_and_scores(model, head, image_batches(files, config, batch))
    return {
        "enabled": True,
        "definition": ood.DEFINITION,
        "threshold": threshold,
        "val_pets": len(val_scores),
        "flagged_val_pets": ood.flagged_rate(val_scores, threshold),
        "pets": len(test_scores),
        "flagged_pets": ood.flagged_rate(test_scores, threshold),
        "median_score_pets": float(np.median(test_scores)) if len(test_scores) else None,
        "non_pets": len(non_pet),
        "non_pet_source": "skimage.data: " + ", ".join(pictures)
        if pictures
        else "scikit-image not installed",
        "flagged_non_pets": ood.flagged_rate(non_pet, threshold),
        "median_score_non_pets": float(np.median(non_pet)) if len(non_pet) else None,
        "non_pet_scores": {name: round(float(v), 6) for name, v in zip(pictures, non_pet, strict=True)},
    }


def compare(test: dict[str, float], baseline_results: dict) -> dict:
    """Test metrics of the fine-tuned model beside the baselines, and whether it beats the linear probe."""
    models = {"fine_tuned": test} | {name: r["test"] for name, r in baseline_results.items()}
    probe = models.get("linear_probe")
    return {
        "models": models,
        "beats_linear_probe_log_loss": None if probe is None else test["log_loss"] <= probe["log_loss"],
    }


def log_to_mlflow(project: Project, result: dict) -> None:
    """Add the test metrics, behaviour rates and evaluation files to the pipeline's MLflow run."""
    paths = project.paths
    with tracking.resume_pipeline_run(project):
        tracking.log_metrics(result["test"], "test/")
        tracking.log_metrics(result["behaviour"], "behaviour/")
        figures = result["ood"]
        if figures["enabled"]:
            keys = ("threshold", "flagged_pets", "flagged_non_pets", "flagged_val_pets")
            tracking.log_metrics({key: figures[key] for key in keys if figures[key] is not None}, "ood/")
        for name, test in result["comparison"]["models"].items():
            if name != "fine_tuned":
                tracking.log_metrics(test, f"baseline/{name}/")
        tracking.log_files(
            [paths.evaluate_metrics, paths.baselines_metrics, paths.evaluate_reports, paths.evaluate_plots],
            "evaluation",
        )


def write_outputs(
    project: Project, result: dict, test_paths: list[Path], y: np.ndarray, proba: np.ndarray, names: list[str]
) -> None:
    """metrics/evaluate.json, DVC plot data, PNG figures, predictions and the worst-errors gallery."""
    paths = project.paths
    paths.metrics.mkdir(parents=True, exist_ok=True)
    paths.evaluate_metrics.write_text(json.dumps(result, indent=2) + "\n")
    paths.evaluate_reports.mkdir(parents=True, exist_ok=True)
    (paths.evaluate_reports / "comparison.md").write_text(
        baselines.comparison_table(result["comparison"]["models"])
    )
    data, figures = paths.evaluate_plots, paths.evaluate_reports
    roc, pr = metrics.roc_points(y, proba), metrics.pr_points(y, proba)
    bins = metrics.calibration_bins(y, proba, bins=10)
    write_csv(roc, data / "roc.csv")
    write_csv(pr, data / "precision_recall.csv")
    write_csv(bins, data / "calibration.csv")
    predicted = proba.argmax(axis=1)
    rel = [p.relative_to(paths.processed).as_posix() for p in test_paths]
    write_csv(
        [
            {"path": r, "actual": names[t], "predicted": names[p]}
            for r, t, p in zip(rel, y, predicted, strict=True)
        ],
        data / "confusion.csv",
    )
    write_csv(
        [
            {"path": r, "label": names[t], "predicted": names[p]}
            | {f"p_{name}": float(v) for name, v in zip(names, row, strict=True)}
            for r, t, p, row in zip(rel, y, predicted, proba, strict=True)
        ],
        figures / "predictions.csv",
    )
    plots.curve(roc, "fpr", "tpr", f"ROC (AUC {result['test']['roc_auc']:.4f})", figures / "roc.png")
    plots.curve(
        pr, "recall", "precision", "Precision-recall (dog = positive)", figures / "precision_recall.png"
    )
    plots.confusion_matrix(result["confusion_matrix"]["matrix"], names, figures / "confusion_matrix.png")
    plots.reliability(bins, figures / "calibration.png")
    k = project.params.evaluate.worst_examples
    plots.gallery(worst_errors(test_paths, y, proba, names, k), figures / "worst_misclassified.png")

"""DVC stage `export`: models/model.ckpt to a self-contained ONNX model for the torch-free service.

Writes models/model.onnx (fp32, dynamic batch, softmax inside, labels/preprocessing/lineage in its
metadata) only when its probabilities match PyTorch's on real test images within export.parity_tolerance,
then models/model.int8.onnx (static int8 quantization calibrated on training images, when
export.quantization.enabled; approved for serving only when its test accuracy is within
export.quantization.max_accuracy_drop points of the fp32 model's), models/labels.json,
models/reference_stats.json (image properties of the training split and the model's confidence on the
validation split, for drift monitoring), metrics/export.json (parity, size, test accuracy of both ONNX
models, onnxruntime latency and throughput) and models/model_card.md. Both ONNX files carry their precision
and test figures in their metadata.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from catdog import export, image_stats, onnx_model, ood, quantize, tracking
from catdog.config import Project
from catdog.errors import CatdogError
from catdog.lineage import data_version, git_state
from catdog.preprocessing import PreprocessConfig
from catdog.stages.prepare import read_manifest
from catdog.training.checkpoint import load_classifier, read_checkpoint
from catdog.training.runtime import available_cores

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
TEST_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")
METADATA_TEST_METRICS = (*TEST_METRICS, "ece")
TRAIN_FIELDS = (
    "model",
    "pretrained",
    "image_size",
    "batch_size",
    "epochs_frozen",
    "epochs_unfrozen",
    "lr_head",
    "lr_backbone",
    "weight_decay",
    "optimizer",
    "scheduler",
    "warmup_fraction",
    "early_stopping_patience",
    "precision",
    "limit_images",
)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def original_sizes(validation_images: Path) -> dict[str, tuple[int, int]]:
    """Raw image path -> (width, height) from validate's per-file table; empty when it is absent."""
    if not validation_images.is_file():
        return {}
    with validation_images.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {
        row["path"]: (int(row["width"]), int(row["height"]))
        for row in rows
        if (row.get("width") or "").isdigit() and (row.get("height") or "").isdigit() and int(row["height"])
    }


def lineage(project: Project) -> dict[str, Any]:
    """Data version (dvc.lock) and git commit / dirty flag of the working tree."""
    git = git_state(project.root)
    return {
        "data_version": data_version(project.paths.dvc_lock),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
    }


def onnx_metadata(
    model_name: str, config: PreprocessConfig, class_names: list[str], origin: dict[str, Any]
) -> dict[str, str]:
    """The metadata_props stored in the ONNX file (all strings)."""
    return {
        "labels": json.dumps(class_names),
        "preprocessing": config.to_json(),
        "model_name": model_name,
        "data_version": origin["data_version"] or UNKNOWN,
        "git_commit": origin["git_commit"] or UNKNOWN,
        "git_dirty": json.dumps(origin["git_dirty"]),
    }


def split_paths(project: Project, rows: list[dict[str, str]], split: str) -> list[Path]:
    return [project.paths.processed / row["path"] for row in rows if row["split"] == split]


def partial_path(path: Path) -> Path:
    """Where a file is written before it is renamed into place."""
    return path.with_name(path.name + ".partial")


def export_checked(project: Project) -> dict[str, Any]:
    """Export the checkpoint and keep models/model.onnx only when it passes the parity check."""
    paths, params = project.paths, project.params.export
    model, config, class_names = load_classifier(paths.model_checkpoint)
    hparams = read_checkpoint(paths.model_checkpoint)["hyper_parameters"]
    head = ood.imagenet_head(str(hparams["model_name"])) if params.ood.enabled else None
    origin = lineage(project)
    partial = partial_path(paths.onnx_model)
    started = time.perf_counter()
    try:
        export.export_onnx(
            model,
            config,
            partial,
            onnx_metadata(str(hparams["model_name"]), config, class_names, origin),
            params.opset,
            head,
        )
        seconds = time.perf_counter() - started
        sess = onnx_model.session(partial)
        rows = read_manifest(paths.split_manifest)
        test = export.sample(split_paths(project, rows, "test"), params.parity_images, project.params.seed)
        inputs = export.load_inputs(test, config)
        difference = export.parity_difference(model, sess, inputs)
        export.check_parity(difference, params.parity_tolerance, len(inputs))
        score_difference = None
        if head is not None:
            score_difference = export.score_parity_difference(model, head, sess, inputs)
            export.check_parity(score_difference, params.parity_tolerance, len(inputs), "pet_score")
        val = split_outputs(project, sess, split_paths(project, rows, "val"), config)
        calibration = ood_calibration(project, val, rows, class_names) if head is not None else None
        if calibration is not None:
            export.add_metadata(partial, {onnx_model.OOD_KEY: json.dumps(calibration)})
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(paths.onnx_model)
    return {
        "model_name": str(hparams["model_name"]),
        "pretrained": bool(hparams.get("pretrained", False)),
        "config": config,
        "class_names": class_names,
        "lineage": origin,
        "session": sess,
        "rows": rows,
        "parity_inputs": inputs,
        "export_seconds": round(seconds, 2),
        "parity": {
            "images": len(inputs),
            "max_abs_diff": difference,
            **({} if score_difference is None else {"pet_score_max_abs_diff": score_difference}),
            "tolerance": params.parity_tolerance,
            "passed": True,
        },
        "val_probabilities": val["probabilities"],
        "ood": calibration,
    }


def split_outputs(
    project: Project, sess: ort.InferenceSession, files: list[Path], config: PreprocessConfig
) -> dict[str, Any]:
    """Probabilities (N, classes) and, when the model has it, pet scores (N,) of image files from one
    onnxruntime pass, export.batch_size at a time."""
    scored = onnx_model.has_score(sess)
    probabilities, scores = [], []
    for batch in export.path_batches(files, config, project.params.export.batch_size):
        probs, score = onnx_model.predict(sess, batch, scored)
        probabilities.append(probs)
        if score is not None:
            scores.append(score)
    return {
        "probabilities": np.concatenate(probabilities) if probabilities else np.zeros((0, 2), np.float32),
        "scores": np.concatenate(scores) if scores else None if not scored else np.zeros(0, np.float32),
    }


def ood_calibration(
    project: Project, val: dict[str, Any], rows: list[dict[str, str]], class_names: list[str]
) -> dict[str, Any]:
    """The out-of-distribution score's threshold, calibrated on the validation split (all of it is pets),
    and its definition: the ONNX metadata `ood`."""
    params = project.params.export.ood
    scores = val["scores"]
    threshold = ood.calibrate_threshold(
        scores, params.pet_quantile, params.min_threshold, params.max_threshold
    )
    return {
        "output": onnx_model.SCORE_NAME,
        "definition": ood.DEFINITION,
        "threshold": round(threshold, 6),
        "calibration": {
            "split": "val",
            "images": len(scores),
            "pet_quantile": params.pet_quantile,
            "min_threshold": params.min_threshold,
            "max_threshold": params.max_threshold,
            "val_flagged": ood.flagged_rate(scores, threshold),
            "val_median_score": float(np.median(scores)) if len(scores) else None,
        },
    }


def held_out(project: Project, exported: dict[str, Any]) -> dict[str, Any]:
    """The test split's files, their class indices (labels.json order) and the fp32 ONNX probabilities."""
    rows = [row for row in exported["rows"] if row["split"] == "test"]
    files = [project.paths.processed / row["path"] for row in rows]
    outputs = split_outputs(project, exported["session"], files, exported["config"])
    return {
        "paths": files,
        "y_true": np.asarray([exported["class_names"].index(row["label"]) for row in rows], dtype=np.int64),
        "fp32": outputs["probabilities"],
        "fp32_scores": outputs["scores"],
    }


def quantize_model(project: Project, exported: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    """The int8 model of models/model.onnx, written to models/model.int8.onnx.partial and compared with
    fp32 on the test split; returns its session and metrics/export.json's quantization block."""
    paths, params = project.paths, project.params.export.quantization
    train = split_paths(project, exported["rows"], "train")
    calibration = export.sample(train, params.calibration_images, project.params.seed)
    if not calibration:
        raise CatdogError("no training images to calibrate the int8 model with (data/processed/manifest.csv)")
    target = partial_path(paths.int8_model)
    reader = quantize.ImageCalibrationReader(calibration, exported["config"])
    quantize.quantize_int8(paths.onnx_model, target, reader, params.per_channel)
    sess = onnx_model.session(target)
    outputs = split_outputs(project, sess, test["paths"], exported["config"])
    int8 = outputs["probabilities"]
    block = {
        "enabled": True,
        **quantize.settings(params.per_channel, len(calibration)),
        "int8_size_mb": export.model_size_mb(target),
        **quantize.comparison(test["y_true"], test["fp32"], int8, params.max_accuracy_drop),
    }
    if test["fp32_scores"] is not None:
        if outputs["scores"] is None:
            raise CatdogError(f"the int8 model lost the {onnx_model.SCORE_NAME} output")
        diff = np.abs(outputs["scores"] - test["fp32_scores"])
        block["max_abs_pet_score_diff"] = round(float(diff.max()), 6) if len(diff) else 0.0
    if not block["approved"]:
        log.warning(
            "the int8 model loses %.2f points of test accuracy (limit %g): not approved for serving",
            block["accuracy_drop_points"],
            params.max_accuracy_drop,
        )
    return {"session": sess, "block": block}


def runtime_speed(
    project: Project, exported: dict[str, Any], quantized: dict[str, Any] | None
) -> dict[str, Any]:
    """onnxruntime speed of the fp32 model, and of the int8 one right after it (same inputs, batch size)."""
    params = project.params.export
    inputs = exported["parity_inputs"]
    fp32 = export.benchmark(exported["session"], inputs, params.latency_runs, params.throughput_batch_size)
    if quantized is None:
        return {"fp32": fp32}
    int8 = export.benchmark(quantized["session"], inputs, params.latency_runs, params.throughput_batch_size)
    return {"fp32": fp32, "int8": int8}


def quantization_block(quantized: dict[str, Any] | None, speed: dict[str, Any]) -> dict[str, Any]:
    """metrics/export.json's quantization block, speed and speed-up over fp32 included."""
    if quantized is None:
        return {"enabled": False}
    ratio = speed["int8"]["images_per_second"] / speed["fp32"]["images_per_second"]
    return {**quantized["block"], "onnxruntime": speed["int8"], "speedup": round(ratio, 2)}


def evaluation_test_metrics(project: Project) -> dict[str, float] | None:
    """The evaluate stage's test metrics of the checkpoint, when metrics/evaluate.json exists."""
    test = (read_json(project.paths.evaluate_metrics) or {}).get("test")
    if not test:
        return None
    return {name: test[name] for name in METADATA_TEST_METRICS if name in test}


def metrics_metadata(project: Project, metrics: dict[str, Any]) -> str:
    """The `metrics` metadata of both ONNX files (JSON): evaluation, ONNX test figures, the int8 verdict."""
    figures: dict[str, Any] = {}
    test = evaluation_test_metrics(project)
    if test is not None:
        figures["test"] = test
    figures["onnx_test"] = {key: metrics["onnx_test"][key] for key in ("accuracy", "log_loss")}
    figures["quantization"] = quantize.summary(metrics["quantization"])
    return json.dumps(figures)


def stamp_models(project: Project, metrics: dict[str, Any], int8: Path | None) -> None:
    """Precision and test figures into the metadata of models/model.onnx, and all of its metadata (labels,
    preprocessing, lineage) plus the verdict into the int8 model's."""
    fp32 = project.paths.onnx_model
    export.add_metadata(fp32, {"precision": "fp32", "metrics": metrics_metadata(project, metrics)})
    if int8 is not None:
        approved = json.dumps(bool(metrics["quantization"]["approved"]))
        props = {**export.onnx_metadata(fp32), "precision": "int8", "int8_approved": approved}
        export.add_metadata(int8, props)


def reference_statistics(project: Project, exported: dict[str, Any]) -> dict[str, Any]:
    """Image properties of the training split and the model's outputs on the validation split."""
    paths, params = project.paths, project.params.export
    config: PreprocessConfig = exported["config"]
    rows = [row for row in exported["rows"] if row["split"] == "train"]
    rows = export.sample(rows, params.reference_images, project.params.seed)
    sizes = original_sizes(paths.validation_images)
    originals = [sizes.get(row.get("source") or "") for row in rows]
    properties = export.image_rows([paths.processed / row["path"] for row in rows], config, originals)
    probabilities = exported["val_probabilities"]
    return {
        "preprocessing": json.loads(config.to_json()),
        "images": {
            "split": "train",
            "count": len(rows),
            "with_original_size": sum(size is not None for size in originals),
            "properties": image_stats.reference_statistics(properties),
        },
        "predictions": {
            "split": "val",
            **export.prediction_reference(probabilities, exported["class_names"]),
        },
    }


def run(root: Path | None = None) -> dict[str, Any]:
    """Export, quantize, check and document the model; returns metrics/export.json's content."""
    project = Project(root)
    paths = project.paths
    started = time.perf_counter()
    exported = export_checked(project)
    paths.int8_model.unlink(missing_ok=True)
    int8 = partial_path(paths.int8_model)
    try:
        metrics = measure(project, exported, started)
        paths.model_card.write_text(model_card(project, exported, metrics))
        stamp_models(project, metrics, int8 if metrics["quantization"]["enabled"] else None)
        if metrics["quantization"]["enabled"]:
            int8.replace(paths.int8_model)
    finally:
        int8.unlink(missing_ok=True)
    log_to_mlflow(project, exported, metrics)
    print(summary_line(project, metrics))
    return metrics


def measure(project: Project, exported: dict[str, Any], started: float) -> dict[str, Any]:
    """Quantize, evaluate and benchmark; writes labels.json, reference_stats.json and metrics/export.json."""
    paths, params = project.paths, project.params.export
    test = held_out(project, exported)
    quantized = quantize_model(project, exported, test) if params.quantization.enabled else None
    speed = runtime_speed(project, exported, quantized)
    reference = reference_statistics(project, exported)
    export.write_json(exported["class_names"], paths.labels)
    export.write_json(reference, paths.reference_stats)
    metrics = {
        "model": exported["model_name"],
        "opset": params.opset,
        "onnx_size_mb": export.model_size_mb(paths.onnx_model),
        "export_seconds": exported["export_seconds"],
        "parity": exported["parity"],
        "onnxruntime": {"version": ort.__version__, "cpu_cores": available_cores(), **speed["fp32"]},
        "onnx_test": {"images": len(test["y_true"]), **quantize.figures(test["y_true"], test["fp32"])},
        "quantization": quantization_block(quantized, speed),
        "ood": ood_block(exported, test),
        "reference_images": reference["images"]["count"],
        "reference_predictions": reference["predictions"]["count"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    export.write_json(metrics, paths.export_metrics)
    return metrics


def ood_block(exported: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    """metrics/export.json's out-of-distribution block: the threshold and the test pets it flags."""
    calibration = exported["ood"]
    if calibration is None:
        return {"enabled": False}
    scores = test["fp32_scores"]
    return {
        "enabled": True,
        "output": calibration["output"],
        "threshold": calibration["threshold"],
        **calibration["calibration"],
        "test_images": len(scores),
        "test_flagged": ood.flagged_rate(scores, calibration["threshold"]),
        "test_median_score": float(np.median(scores)) if len(scores) else None,
    }


def log_to_mlflow(project: Project, exported: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Metrics, the model's files and the ONNX model (the int8 one and the files as its extra files)."""
    paths = project.paths
    files = [paths.model_card, paths.labels, paths.reference_stats, paths.export_metrics]
    quantization = metrics["quantization"]
    with tracking.resume_pipeline_run(project):
        tracking.log_metrics(metrics, "export/")
        if quantization["enabled"]:
            tracking.log_metrics({"approved": int(quantization["approved"])}, "export/quantization/")
        tracking.log_files(files, "model_files")
        model_uri = tracking.log_onnx_model(
            paths.onnx_model, exported["config"].size, [paths.int8_model, *files]
        )
    log.info("MLflow model %s", model_uri)


def summary_line(project: Project, metrics: dict[str, Any]) -> str:
    """The stage's one-line report on the terminal."""
    paths, speed, quantization = project.paths, metrics["onnxruntime"], metrics["quantization"]
    line = (
        f"export: {paths.onnx_model} ({metrics['onnx_size_mb']} MB, "
        f"parity {metrics['parity']['max_abs_diff']:.2g}, "
        f"test accuracy {metrics['onnx_test']['accuracy']:.4f}, "
        f"{speed['latency_ms_median']} ms/image, {speed['images_per_second']} images/s at batch "
        f"{speed['batch_size']})"
    )
    if quantization["enabled"]:
        verdict = "approved" if quantization["approved"] else "NOT approved"
        line += (
            f"; {paths.int8_model} ({quantization['int8_size_mb']} MB, accuracy drop "
            f"{quantization['accuracy_drop_points']:.2f} points, {verdict}, "
            f"{quantization['onnxruntime']['images_per_second']} images/s, x{quantization['speedup']})"
        )
    return line + f"; model card {paths.model_card}"


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _cell(value: Any) -> str:
    """A parameter value as params.yaml spells it."""
    if isinstance(value, dict):
        return ", ".join(f"{key} {_cell(item)}" for key, item in value.items())
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_cell(item) for item in value) + "]"
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _model_section(exported: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    config: PreprocessConfig = exported["config"]
    return [
        "## Model",
        "",
        f"- Task: binary image classification; outputs P({exported['class_names'][0]}) and "
        f"P({exported['class_names'][1]}) in that order (models/labels.json).",
        f"- Architecture: `{exported['model_name']}`"
        + (", ImageNet-pretrained, fine-tuned" if exported["pretrained"] else ", trained from scratch")
        + ".",
        f"- Input: RGB {config.size}x{config.size}, resize `{config.resize}`, normalised with mean "
        f"{list(config.mean)} and std {list(config.std)} by `catdog.preprocessing` (EXIF orientation, any "
        "mode to 8-bit RGB, alpha on white).",
        f"- Format: ONNX opset {metrics['opset']}, float32, one self-contained file of "
        f"{metrics['onnx_size_mb']} MB; input `image` (batch, 3, {config.size}, {config.size}), outputs "
        "`probabilities` (softmax) and `logits`, both (batch, 2)"
        + (", and `pet_score` (batch,)" if metrics["ood"]["enabled"] else "")
        + ". The metadata holds `labels`, `preprocessing`, `model_name`, `data_version`, `git_commit`, "
        "`precision`, `metrics` (test figures)" + (" and `ood`" if metrics["ood"]["enabled"] else "") + ".",
        "",
    ]


def _ood_section(metrics: dict[str, Any]) -> list[str]:
    block = metrics["ood"]
    header = ["## Out-of-distribution warning", ""]
    if not block["enabled"]:
        return [
            *header,
            "None: this architecture has no ImageNet classifier to score with (or export.ood.enabled is "
            "false); the service reports `in_distribution` null.",
            "",
        ]
    return [
        *header,
        f"- `pet_score`: {ood.DEFINITION}.",
        f"- Threshold {block['threshold']:.4f}: the {block['pet_quantile']:g} quantile of the score on "
        f"{block['images']} validation pets, clipped to [{block['min_threshold']:g}, "
        f"{block['max_threshold']:g}]. Below it the service flags the picture as not a cat or a dog "
        "(`in_distribution.flag` false) and still returns the binary answer.",
        f"- Flagged: {_share(block['val_flagged'])} of validation pets, {_share(block['test_flagged'])} of "
        f"{block['test_images']} test pets. The evaluate stage reports the share of real non-pet photos "
        "flagged (metrics/evaluate.json `ood`).",
        "",
    ]


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _data_section(project: Project, exported: dict[str, Any]) -> list[str]:
    paths = project.paths
    source = read_json(paths.source_info) or {"kind": "configured", "location": project.params.data.source}
    lines = [
        "## Data",
        "",
        f"- Source: Kaggle/Microsoft Cats and Dogs photos (PetImages layout), {source['kind']} "
        f"`{source['location']}`.",
        f"- Data version (DVC hash of data/processed): `{exported['lineage']['data_version'] or UNKNOWN}`.",
    ]
    prepare = read_json(paths.prepare_metrics)
    if prepare:
        splits = prepare.get("splits", {})
        rows = [
            (s, *(c.get(n, 0) for n in exported["class_names"]), sum(c.values())) for s, c in splits.items()
        ]
        lines += ["", *_table(("split", *exported["class_names"], "total"), rows)]
    validation = read_json(paths.validation_metrics)
    if validation:
        problems = ", ".join(f"{k} {v}" for k, v in validation.get("problems", {}).items()) or "none"
        lines += [
            "",
            f"- Validation: {validation.get('total')} raw files, {validation.get('usable')} usable, "
            f"{validation.get('unusable')} unusable, {validation.get('excluded_duplicates')} duplicates left "
            f"out; problems: {problems}.",
        ]
    return [*lines, ""]


def _training_section(project: Project) -> list[str]:
    train = project.params.train.model_dump()
    rows = [(name, train[name]) for name in TRAIN_FIELDS]
    rows += [("augment", train["augment"]), ("seed", project.params.seed)]
    lines = ["## Training", "", *_table(("parameter", "value"), [(k, _cell(v)) for k, v in rows])]
    summary = read_json(project.paths.train_metrics)
    if summary and summary.get("best"):
        best = summary["best"]
        lines += [
            "",
            f"Best epoch {summary.get('best_epoch')}: val loss {_number(best.get('val/loss'))}, "
            f"val accuracy {_number(best.get('val/acc'))}.",
        ]
    return [*lines, ""]


def _evaluation_sections(project: Project) -> list[str]:
    evaluation = read_json(project.paths.evaluate_metrics)
    test = (evaluation or {}).get("test")
    if not test:
        return [
            "## Evaluation (test split)",
            "",
            "Not evaluated: metrics/evaluate.json was not found when the model was exported.",
            "",
            "## Calibration",
            "",
            "Not evaluated.",
            "",
        ]
    rows = [(name, _number(test[name])) for name in TEST_METRICS if name in test]
    ece = test.get("ece")
    return [
        "## Evaluation (test split)",
        "",
        f"{evaluation.get('images', 'All')} held-out test images; dog is the positive class.",
        "",
        *_table(("metric", "value"), rows),
        "",
        "## Calibration",
        "",
        f"Expected calibration error (top-class confidence, equal-width bins): {_number(ece)}."
        if ece is not None
        else "Not evaluated.",
        "",
    ]


def _runtime_section(metrics: dict[str, Any]) -> list[str]:
    parity, speed, test = metrics["parity"], metrics["onnxruntime"], metrics["onnx_test"]
    return [
        "## ONNX parity and speed",
        "",
        f"- Parity: max |P_onnx - P_torch| = {parity['max_abs_diff']:.2e} on {parity['images']} test images "
        f"(tolerance {parity['tolerance']:g}).",
        f"- onnxruntime on all {test['images']} test images: accuracy {_number(test['accuracy'])}, "
        f"log loss {_number(test['log_loss'])}.",
        f"- onnxruntime {speed['version']} (CPUExecutionProvider, {speed['cpu_cores']} CPU cores): "
        f"{speed['latency_ms_median']} ms per image (median; p95 {speed['latency_ms_p95']} ms), "
        f"{speed['images_per_second']} images/s at batch {speed['batch_size']}; preprocessing not included.",
        "",
    ]


def _quantization_section(metrics: dict[str, Any]) -> list[str]:
    quantization = metrics["quantization"]
    header = ["## Quantized int8 model", ""]
    if not quantization["enabled"]:
        return [*header, "Not produced (export.quantization.enabled is false): the service serves fp32.", ""]
    fp32, int8, speed = quantization["fp32"], quantization["int8"], quantization["onnxruntime"]
    verdict = (
        "**Approved**: the service may serve it (MODEL_PRECISION=int8, or auto, which prefers it)."
        if quantization["approved"]
        else "**Not approved**: it lost more test accuracy than allowed; the service serves fp32 "
        "(MODEL_PRECISION=auto) and refuses MODEL_PRECISION=int8."
    )
    rows = [
        ("accuracy", _number(fp32["accuracy"]), _number(int8["accuracy"])),
        ("log_loss", _number(fp32["log_loss"]), _number(int8["log_loss"])),
        ("images/s", metrics["onnxruntime"]["images_per_second"], speed["images_per_second"]),
        ("latency ms (median)", metrics["onnxruntime"]["latency_ms_median"], speed["latency_ms_median"]),
        ("size MB", metrics["onnx_size_mb"], quantization["int8_size_mb"]),
    ]
    return [
        *header,
        f"models/model.int8.onnx: onnxruntime static quantization ({quantization['format']}, "
        f"{quantization['weight_type']} weights{' per channel' if quantization['per_channel'] else ''}, "
        f"{quantization['activation_type']} activations calibrated ({quantization['calibration_method']}) on "
        f"{quantization['calibration_images']} training images; the classifier head stays float32). Same "
        "input and outputs as the fp32 model.",
        "",
        *_table(("ONNX, test split", "fp32", "int8"), rows),
        "",
        f"- Accuracy drop: {quantization['accuracy_drop_points']:.2f} points on "
        f"{quantization['test_images']} test images (allowed: {quantization['max_accuracy_drop']:g}); "
        f"max |P_int8 - P_fp32| = {quantization['max_abs_prob_diff']:.3g}; speed-up "
        f"x{quantization['speedup']} at batch {speed['batch_size']}.",
        f"- {verdict}",
        "",
    ]


USE_AND_LIMITS = [
    "## Intended use",
    "",
    "- Telling whether a photo shows a cat or a dog, for demonstration and pet-photo sorting; the service "
    "returns both probabilities.",
    "- Not for decisions about animals or people, and not for identifying breeds or individual animals.",
    "",
    "## Known limitations",
    "",
    "- It answers cat or dog for ANY picture: a photo with no pet, with both, with another animal, a "
    "drawing or a screenshot still gets one of the two labels, often with high confidence. There is no "
    "'neither' class; the out-of-distribution score (below) warns about most such pictures, but not all, "
    "and flags a few real pets.",
    "- Trained on the Kaggle PetImages photos: mostly amateur, upright, daylight photos with one animal "
    "near the centre. Other domains (cartoons, night or infrared cameras, extreme close-ups, unusual breeds) "
    "may be classified worse than the test figures suggest.",
    "- That dataset has some mislabelled and non-pet images; the test split carries the same label noise.",
    "- The centre crop to a square (resize `center_crop`) may cut off an animal at the border of a wide "
    "or tall photo.",
    "- Test metrics come from a held-out split of the same collection; live traffic may differ. "
    "models/reference_stats.json holds the training image properties and validation confidences to "
    "monitor drift against.",
    "",
]


def model_card(project: Project, exported: dict[str, Any], metrics: dict[str, Any]) -> str:
    """models/model_card.md: model, data, training, evaluation, runtime, use, limitations, lineage."""
    origin = exported["lineage"]
    dirty = {True: "yes", False: "no", None: UNKNOWN}[origin["git_dirty"]]
    lines = [
        "# Model card: Cats-vs-Dogs classifier",
        "",
        "Generated by the `export` stage (`python -m catdog export`); do not edit by hand.",
        "",
        *_model_section(exported, metrics),
        *_data_section(project, exported),
        *_training_section(project),
        *_evaluation_sections(project),
        *_runtime_section(metrics),
        *_quantization_section(metrics),
        *_ood_section(metrics),
        *USE_AND_LIMITS,
        "## Lineage",
        "",
        f"- Git commit: `{origin['git_commit'] or UNKNOWN}` (uncommitted changes: {dirty}).",
        f"- Data version: `{origin['data_version'] or UNKNOWN}`.",
        f"- Checkpoint: {project.paths.model_checkpoint.relative_to(project.root).as_posix()}.",
        "",
    ]
    return "\n".join(lines)

"""The export stage on a tiny real-photo dataset: ONNX file, metadata, parity, torch-free serving, card."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx
import torch
from conftest import write_tiny_project
from PIL import Image

from catdog import export, onnx_model, tracking
from catdog.config import Project
from catdog.errors import QualityGateError
from catdog.preprocessing import PreprocessConfig, preprocess
from catdog.stages import export as export_stage
from catdog.stages.prepare import MANIFEST_FIELDS
from catdog.training.backbones import build_model, preprocess_config
from catdog.training.checkpoint import load_classifier, predict_proba, write_model_checkpoint
from catdog.training.module import ClassifierModule

SIZE = 64
EXPORT = {"parity_images": 8, "latency_runs": 5, "throughput_batch_size": 4, "batch_size": 4}


def save_checkpoint(project: Project, model_name: str = "simple_cnn") -> None:
    """models/model.ckpt of an untrained channels_last module, written by the training code's helper."""
    torch.manual_seed(0)
    module = ClassifierModule(
        model_name=model_name,
        preprocess=preprocess_config(model_name, SIZE).to_json(),
        pretrained=False,
        epochs_frozen=0,
        channels_last=True,
    )
    lightning = project.paths.train_checkpoints / "best.ckpt"
    lightning.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, lightning)
    write_model_checkpoint(lightning, project.paths.model_checkpoint)


def add_originals(project: Project, sample_images_dir: Path) -> dict[str, tuple[int, int]]:
    """A `source` column in the manifest and validate's table with the raw photos' sizes."""
    paths = project.paths
    with paths.split_manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    sizes = {}
    for row in rows:
        row["source"] = f"PetImages/{row['label'].capitalize()}/{Path(row['path']).name}"
        row["sha256"] = ""
        with Image.open(sample_images_dir / row["source"]) as img:
            sizes[row["source"]] = img.size
    with paths.split_manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    paths.validation_images.parent.mkdir(parents=True, exist_ok=True)
    with paths.validation_images.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "usable", "width", "height"])
        writer.writerows([(source, "", "1", w, h) for source, (w, h) in sizes.items()])
    return {row["path"]: sizes[row["source"]] for row in rows if row["split"] == "train"}


def make_project(root: Path, processed: Path) -> Project:
    write_tiny_project(root, processed, train={"model": "simple_cnn", "pretrained": False}, export=EXPORT)
    project = Project(root)
    save_checkpoint(project)
    with tracking.start_pipeline_run(project):
        pass
    return project


@pytest.fixture(scope="module")
def exported(
    tiny_processed: Path, sample_images_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Project, dict[str, tuple[int, int]]]:
    """A project whose export stage ran on an untrained simple_cnn; shared, so never modified."""
    project = make_project(tmp_path_factory.mktemp("export") / "project", tiny_processed)
    originals = add_originals(project, sample_images_dir)
    prepare = {
        "splits": {"train": {"cat": 8, "dog": 8}, "val": {"cat": 4, "dog": 4}, "test": {"cat": 4, "dog": 4}}
    }
    export.write_json(prepare, project.paths.prepare_metrics)
    export_stage.run(project.root)
    return project, originals


def test_onnx_file_and_metadata(exported: tuple[Project, dict]) -> None:
    paths = exported[0].paths
    proto = onnx.load(str(paths.onnx_model))
    onnx.checker.check_model(proto, full_check=True)
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    assert json.loads(meta["labels"]) == ["cat", "dog"]
    assert PreprocessConfig.from_json(meta["preprocessing"]) == preprocess_config("simple_cnn", SIZE)
    assert meta["model_name"] == "simple_cnn"
    assert {"data_version", "git_commit"} <= set(meta)
    assert sorted(p.name for p in paths.models.iterdir() if p.is_file()) == [
        "labels.json",
        "mlflow_run.json",
        "model.ckpt",
        "model.onnx",
        "model_card.md",
        "reference_stats.json",
    ]
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    assert {t.data_type for t in proto.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    [image] = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert (image.name, image.type.tensor_type.elem_type) == ("image", onnx.TensorProto.FLOAT)
    assert isinstance(dims[0], str) and dims[1:] == [3, SIZE, SIZE]
    assert [o.name for o in proto.graph.output] == ["probabilities", "logits"]
    assert json.loads(paths.labels.read_text()) == ["cat", "dog"]


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_matches_pytorch(exported: tuple[Project, dict], batch: int) -> None:
    paths = exported[0].paths
    model, config, _ = load_classifier(paths.model_checkpoint)
    images = sorted((paths.processed / "test").rglob("*.jpg"))[:batch]
    inputs = export.load_inputs(images, config)
    probs, logits = onnx_model.session(paths.onnx_model).run(None, {"image": inputs})
    assert probs.shape == logits.shape == (batch, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, torch.from_numpy(logits).softmax(dim=1).numpy(), atol=1e-6)
    np.testing.assert_allclose(probs, predict_proba(model, torch.from_numpy(inputs)).numpy(), atol=1e-4)


def test_metrics(exported: tuple[Project, dict]) -> None:
    metrics = json.loads(exported[0].paths.export_metrics.read_text())
    parity = metrics["parity"]
    assert parity["images"] == 8 and parity["passed"] and 0 <= parity["max_abs_diff"] <= 1e-4
    assert metrics["opset"] == 18 and metrics["onnx_size_mb"] > 0.1
    runtime = metrics["onnxruntime"]
    assert 0 < runtime["latency_ms_median"] <= runtime["latency_ms_p95"]
    assert runtime["images_per_second"] > 0 and runtime["batch_size"] == 4


def test_reference_statistics(exported: tuple[Project, dict]) -> None:
    project, originals = exported
    reference = json.loads(project.paths.reference_stats.read_text())
    images = reference["images"]
    assert images["count"] == images["with_original_size"] == 16
    properties = images["properties"]
    assert set(properties) == {
        "brightness",
        "contrast",
        "sharpness",
        "colourfulness",
        "width",
        "height",
        "aspect_ratio",
    }
    widths = sorted(w for w, _ in originals.values())
    assert properties["width"]["quantiles"]["p0"] == widths[0]
    assert properties["width"]["quantiles"]["p100"] == widths[-1]
    assert 0 < properties["brightness"]["mean"] < 1
    assert sum(properties["sharpness"]["histogram"]["counts"]) == 16
    predictions = reference["predictions"]
    assert predictions["split"] == "val" and predictions["count"] == 8
    assert set(predictions["statistics"]) == {"confidence", "p_dog"}
    assert 0.5 <= predictions["statistics"]["confidence"]["quantiles"]["p0"] <= 1
    assert sum(predictions["predicted_share"].values()) == pytest.approx(1.0)


def test_model_card(exported: tuple[Project, dict]) -> None:
    project = exported[0]
    card = project.paths.model_card.read_text()
    for text in (
        "`simple_cnn`",
        "64x64",
        "Known limitations",
        "ANY picture",
        "Intended use",
        "| train | 8 | 8 | 16 |",
    ):
        assert text in card
    assert "Not evaluated" in card
    assert "Parity: max |P_onnx - P_torch|" in card and "ms per image" in card


def test_model_card_reads_evaluation(exported: tuple[Project, dict], tmp_path: Path) -> None:
    project = Project(Path(shutil.copytree(exported[0].root, tmp_path / "project")))
    test = {"accuracy": 0.9712, "precision": 0.97, "recall": 0.972, "f1": 0.971, "roc_auc": 0.995}
    export.write_json(
        {"test": {**test, "log_loss": 0.08, "ece": 0.0123}, "images": 8}, project.paths.evaluate_metrics
    )
    facts = {
        "model_name": "simple_cnn",
        "pretrained": False,
        "config": preprocess_config("simple_cnn", SIZE),
        "class_names": ["cat", "dog"],
        "lineage": {"data_version": "abc123.dir", "git_commit": "f00", "git_dirty": True},
    }
    metrics = json.loads(project.paths.export_metrics.read_text())
    card = export_stage.model_card(project, facts, metrics)
    assert "| accuracy | 0.9712 |" in card and "| log_loss | 0.0800 |" in card
    assert "calibration error" in card and "0.0123" in card
    assert "Not evaluated" not in card
    assert "`abc123.dir`" in card and "uncommitted changes: yes" in card


def test_parity_failure_fails_the_stage(
    exported: tuple[Project, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = make_project(tmp_path / "project", exported[0].paths.processed)
    honest = export.ProbabilityModel.forward

    def skewed(self: export.ProbabilityModel, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs, logits = honest(self, image)
        return probs + 1e-2, logits

    monkeypatch.setattr(export.ProbabilityModel, "forward", skewed)
    with pytest.raises(QualityGateError, match=r"ONNX parity failed: .* = 0\.01"):
        export_stage.run(project.root)
    assert not list(project.paths.models.glob("model.onnx*"))
    assert not project.paths.export_metrics.exists()


def test_check_parity() -> None:
    export.check_parity(0.0, 0.0, 8)
    export.check_parity(1e-5, 1e-4, 8)
    for difference in (2e-4, float("nan")):
        with pytest.raises(QualityGateError, match="8 test images"):
            export.check_parity(difference, 1e-4, 8)


def test_graph_is_fp32_whatever_training_used(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model("simple_cnn").eval().to(memory_format=torch.channels_last).to(torch.bfloat16)
    config = preprocess_config("simple_cnn", 32)
    target = tmp_path / "model.onnx"
    export.export_onnx(model, config, target, {"labels": "[]"})
    proto = onnx.load(str(target))
    assert {t.data_type for t in proto.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert "Transpose" not in {node.op_type for node in proto.graph.node}
    inputs = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert export.parity_difference(model, onnx_model.session(target), inputs) <= 1e-5


SERVICE = textwrap.dedent(
    """
    import json, sys
    import onnxruntime
    from catdog import image_stats
    from catdog.preprocessing import PreprocessConfig, decode, preprocess

    model, image = sys.argv[1], sys.argv[2]
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    config = PreprocessConfig.from_json(meta["preprocessing"])
    labels = json.loads(meta["labels"])
    probs = session.run(["probabilities"], {"image": preprocess(image, config)[None]})[0][0]
    picture = decode(image, size=config.size, resize=config.resize)
    properties = image_stats.image_properties(picture)
    print(json.dumps({
        "label": labels[int(probs.argmax())],
        "probabilities": probs.tolist(),
        "brightness": properties["brightness"],
        "torch": "torch" in sys.modules,
    }))
    """
)


def test_service_classifies_without_torch(exported: tuple[Project, dict], sample_images_dir: Path) -> None:
    paths = exported[0].paths
    photo = sorted((sample_images_dir / "PetImages" / "Dog").glob("*.jpg"))[-1]
    done = subprocess.run(
        [sys.executable, "-c", SERVICE, str(paths.onnx_model), str(photo)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    answer = json.loads(done.stdout)
    assert answer["torch"] is False
    assert answer["label"] in {"cat", "dog"} and 0 < answer["brightness"] < 1
    model, config, _ = load_classifier(paths.model_checkpoint)
    expected = predict_proba(model, torch.from_numpy(preprocess(photo, config)[None]))[0].numpy()
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-4)


@pytest.mark.slow
def test_lite0_export_parity(trained_copy: Path) -> None:
    metrics = export_stage.run(trained_copy)
    project = Project(trained_copy)
    assert metrics["model"] == "tf_efficientnet_lite0"
    assert metrics["parity"]["max_abs_diff"] <= 1e-4 and metrics["parity"]["images"] == 8
    assert export.onnx_metadata(project.paths.onnx_model)["model_name"] == "tf_efficientnet_lite0"
    assert 10 < metrics["onnx_size_mb"] < 20


def test_mlflow_run_holds_the_onnx_model_and_files(exported: tuple[Project, dict]) -> None:
    import mlflow

    project = exported[0]
    info = json.loads(project.paths.run_info.read_text())
    client = mlflow.MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.data.metrics["export/parity/max_abs_diff"] <= 1e-4
    files = {f.path for f in client.list_artifacts(info["run_id"], "model_files")}
    expected = ("model_card.md", "reference_stats.json", "labels.json", "export.json")
    assert {f"model_files/{name}" for name in expected} <= files
    mlflow.set_tracking_uri(info["tracking_uri"])
    model = mlflow.models.get_model_info(run.data.tags["model_uri"])
    assert model.signature.inputs.inputs[0].shape == (-1, 3, SIZE, SIZE)
    assert [spec.name for spec in model.signature.outputs.inputs] == ["probabilities", "logits"]

"""The out-of-distribution score (catdog.ood): its definition, the threshold's calibration, and the exported
tiny real model flagging non-pet pictures but not real pet photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from catdog import onnx_model, ood
from catdog.preprocessing import PreprocessConfig, preprocess_batch


def _head(hot: int) -> nn.Linear:
    head = nn.Linear(4, 1000)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[hot] = 30.0
    return head


@pytest.mark.parametrize(
    ("hot", "pet"),
    [
        (151, True),
        (268, True),
        (281, True),
        (285, True),
        (150, False),
        (269, False),
        (286, False),
        (0, False),
    ],
)
def test_score_is_the_cat_and_dog_probability_mass(hot: int, pet: bool) -> None:
    with torch.no_grad():
        score = ood.pet_score_from_features(_head(hot), torch.zeros(3, 4))
    assert score.shape == (3,)
    assert float(score.min()) == pytest.approx(1.0 if pet else 0.0, abs=1e-6)
    assert len(ood.PET_CLASSES) == 118 + 5


def test_calibrated_threshold_is_a_clipped_quantile() -> None:
    scores = np.linspace(0, 1, 101)
    assert ood.calibrate_threshold(scores, 0.3, 0.1, 0.5) == pytest.approx(0.3)
    assert ood.calibrate_threshold(scores, 0.03, 0.1, 0.5) == pytest.approx(0.1)
    assert ood.calibrate_threshold(scores, 0.9, 0.1, 0.5) == pytest.approx(0.5)
    assert ood.calibrate_threshold(np.zeros(0), 0.03, 0.1, 0.5) == 0.1
    assert ood.flagged_rate(np.array([0.05, 0.2, 0.9]), 0.1) == pytest.approx(1 / 3)
    assert ood.flagged_rate(np.zeros(0), 0.1) is None


def test_models_without_an_imagenet_head_have_no_score() -> None:
    assert ood.imagenet_head("simple_cnn") is None
    head = ood.imagenet_head("tf_efficientnet_lite0")
    assert isinstance(head, nn.Linear) and head.out_features == 1000


def test_skimage_non_pets_are_bundled_pictures() -> None:
    pictures = ood.skimage_non_pets()
    assert set(pictures) == set(ood.SKIMAGE_NON_PETS)
    assert all(p.mode == "RGB" and min(p.size) >= 100 for p in pictures.values())
    assert not {"chelsea", "cat", "horse"} & set(pictures)


@pytest.fixture(scope="module")
def non_pet_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return ood.save_pictures(ood.skimage_non_pets(), tmp_path_factory.mktemp("non_pets"))


def _scores(model: Path, files: list[Path]) -> tuple[np.ndarray, float]:
    sess = onnx_model.session(model)
    config = PreprocessConfig.from_json(onnx_model.metadata(sess)["preprocessing"])
    threshold = onnx_model.ood_threshold(sess)
    assert threshold is not None
    _, scores = onnx_model.predict(sess, preprocess_batch(files, config), scored=True)
    return scores, threshold


def test_exported_model_flags_non_pets_not_pets(exported_model: Path, photos, non_pet_files) -> None:
    """The tiny fixture model (96 px, head-only training: the pretrained backbone): real pet photos it never
    trained on pass, the skimage.data non-pet pictures are flagged."""
    pets = photos["cat"] + photos["dog"]
    pet_scores, threshold = _scores(exported_model / onnx_model.FP32_FILE, pets)
    non_pet_scores, _ = _scores(exported_model / onnx_model.FP32_FILE, non_pet_files)
    spec = json.loads(onnx_model.metadata(onnx_model.session(exported_model / "model.onnx"))["ood"])
    assert (
        spec["output"] == "pet_score" and "281-285" in spec["definition"] and spec["threshold"] == threshold
    )
    assert 0.1 <= threshold <= 0.5
    assert ood.flagged_rate(pet_scores, threshold) <= 0.15
    assert ood.flagged_rate(non_pet_scores, threshold) >= 0.9
    assert np.median(pet_scores) > 4 * np.median(non_pet_scores)


def test_int8_model_keeps_the_score(exported_model: Path, photos, non_pet_files) -> None:
    files = photos["cat"][:5] + photos["dog"][:5] + non_pet_files
    fp32, threshold = _scores(exported_model / onnx_model.FP32_FILE, files)
    int8, int8_threshold = _scores(exported_model / onnx_model.INT8_FILE, files)
    assert int8_threshold == threshold
    agree = ((fp32 >= threshold) == (int8 >= threshold)).mean()
    assert agree >= 0.9, (fp32, int8)


def test_export_and_evaluate_report_the_flagged_shares(served_project: Path) -> None:
    exported = json.loads((served_project / "metrics" / "export.json").read_text())["ood"]
    assert exported["enabled"] and exported["output"] == "pet_score"
    assert exported["threshold"] == pytest.approx(
        json.loads((served_project / "metrics" / "evaluate.json").read_text())["ood"]["threshold"], abs=1e-4
    )
    parity = json.loads((served_project / "metrics" / "export.json").read_text())["parity"]
    assert parity["pet_score_max_abs_diff"] <= 1e-4
    evaluated = json.loads((served_project / "metrics" / "evaluate.json").read_text())["ood"]
    assert evaluated["non_pets"] == len(ood.SKIMAGE_NON_PETS)
    assert evaluated["flagged_non_pets"] >= 0.9
    assert evaluated["flagged_pets"] <= 0.5  # 8 test pets of a 2-epoch 96 px model
    assert "Out-of-distribution warning" in (served_project / "models" / "model_card.md").read_text()
    import mlflow

    info = json.loads((served_project / "models" / "mlflow_run.json").read_text())
    run = mlflow.MlflowClient(info["tracking_uri"]).get_run(info["run_id"])
    assert run.data.metrics["ood/flagged_non_pets"] == pytest.approx(evaluated["flagged_non_pets"])
    assert run.data.metrics["ood/flagged_pets"] == pytest.approx(evaluated["flagged_pets"])


def test_a_model_without_the_score_gives_no_verdict(exported_model: Path, tmp_path: Path, photos) -> None:
    """The service's view (api.predictor.ScoredModel, torch-free) of a model without `pet_score`: plain
    probabilities and in_distribution null."""
    import onnx

    from api.model_loader import load
    from api.predictor import ScoredModel
    from api.schemas import PredictionOut

    proto = onnx.load(str(exported_model / onnx_model.FP32_FILE))
    [score] = [output for output in proto.graph.output if output.name == onnx_model.SCORE_NAME]
    proto.graph.output.remove(score)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    files = photos["cat"][:2]
    plain = ScoredModel(load(str(tmp_path / "model.onnx"), "fp32"))
    scored = ScoredModel(load(str(exported_model / onnx_model.FP32_FILE), "fp32"))
    assert plain.threshold is None and scored.threshold is not None
    batch = preprocess_batch(files, plain.bundle.config)
    rows, scored_rows = plain.predict(batch), scored.predict(batch)
    assert rows.shape == (2, 2) and scored_rows.shape == (2, 3)
    np.testing.assert_allclose(rows, scored_rows[:, :2], atol=1e-6)
    assert plain.split(rows[0])[1] is None
    probabilities, verdict = scored.split(scored_rows[0])
    assert probabilities.shape == (2,) and verdict is not None and verdict.flag
    out = PredictionOut(
        label="cat",
        probabilities={"cat": 1.0, "dog": 0.0},
        model={"name": "m", "version": "1"},
        prediction_id="0" * 32,
        request_id="r",
        latency_ms=1.0,
    )
    assert out.model_dump()["in_distribution"] is None

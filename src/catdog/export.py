"""ONNX export of the classifier, its parity and speed under onnxruntime, and drift reference statistics.

The exported graph takes `image` float32 (batch, 3, size, size), normalised by catdog.preprocessing, and
returns `probabilities` (softmax inside the graph) and `logits`, both (batch, classes), and, for backbones
with an ImageNet head, `pet_score` (batch,): the out-of-distribution score of catdog.ood, computed from the
same pooled features. Its metadata holds everything the torch-free prediction service needs: labels, the
preprocessing recipe, the lineage and the score's threshold.
"""

from __future__ import annotations

import json
import logging
import random
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from catdog import image_stats, ood
from catdog.errors import CatdogError, QualityGateError
from catdog.onnx_model import INPUT_NAME, OUTPUT_NAMES, SCORE_NAME
from catdog.preprocessing import PreprocessConfig, decode, preprocess_batch
from catdog.training.checkpoint import predict_proba

SIZE_PROPERTIES = ("width", "height", "aspect_ratio")
LOW_PRECISION = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


class ProbabilityModel(nn.Module):
    """The exported computation: images to (softmax probabilities, logits)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(image)
        return logits.softmax(dim=-1), logits


class ScoredProbabilityModel(nn.Module):
    """images -> (softmax probabilities, logits, pet_score): one backbone pass feeds both heads."""

    def __init__(self, classifier: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.scored = ood.ScoredClassifier(classifier, head)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, score = self.scored(image)
        return logits.softmax(dim=-1), logits, score


def as_fp32(model: nn.Module) -> nn.Module:
    """The model in eval mode with float32, contiguous (NCHW) weights, whatever training used."""
    return model.float().to(memory_format=torch.contiguous_format).eval()


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings and its graph passes' INFO logging for the duration."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(
    model: nn.Module,
    config: PreprocessConfig,
    target: Path,
    metadata: Mapping[str, str],
    opset: int = 18,
    head: nn.Module | None = None,
) -> None:
    """Write `model` (logits out) as one self-contained fp32 ONNX file with a dynamic batch axis; with the
    ImageNet `head`, the graph also outputs the out-of-distribution score `pet_score`."""
    if head is None:
        wrapper: nn.Module = ProbabilityModel(as_fp32(model)).eval()
        outputs = list(OUTPUT_NAMES)
    else:
        wrapper = ScoredProbabilityModel(as_fp32(model), head.float().eval()).eval()
        outputs = [*OUTPUT_NAMES, SCORE_NAME]
    example = torch.zeros(2, 3, config.size, config.size)
    target.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), torch.autocast("cpu", enabled=False), _quiet():
        torch.onnx.export(
            wrapper,
            (example,),
            str(target),
            input_names=[INPUT_NAME],
            output_names=outputs,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    proto = onnx.load(str(target))
    onnx.helper.set_model_props(proto, dict(metadata))
    check_exported(proto)
    onnx.save(proto, str(target))


def check_exported(proto: onnx.ModelProto) -> None:
    """Refuse a graph with external data, low-precision (fp16/bf16) tensors or casts, or an invalid graph.

    fp16/bf16 would change the numbers the parity check vouched for; int8 QDQ (quantize.py) is fine: its
    int8 initializers pass, and it computes on float32 inputs and outputs like the fp32 model.
    """
    onnx.checker.check_model(proto, full_check=True)
    problems = [
        f"initializer {t.name} stored externally"
        for t in proto.graph.initializer
        if onnx.external_data_helper.uses_external_data(t)
    ]
    problems += [
        f"initializer {t.name} is {onnx.TensorProto.DataType.Name(t.data_type)}"
        for t in proto.graph.initializer
        if t.data_type in LOW_PRECISION
    ]
    problems += [
        f"node {node.name} casts to {onnx.TensorProto.DataType.Name(attr.i)}"
        for node in proto.graph.node
        if node.op_type == "Cast"
        for attr in node.attribute
        if attr.name == "to" and attr.i in LOW_PRECISION
    ]
    if problems:
        raise CatdogError(
            f"the exported ONNX graph is not a self-contained fp32 (or int8 QDQ) model: {'; '.join(problems)}"
        )


def add_metadata(path: Path, props: Mapping[str, str]) -> None:
    """Add (or replace) metadata_props of an ONNX file, keeping the others; rewritten atomically, checked,
    and still self-contained."""
    proto = onnx.load(str(path))
    existing = {prop.key: prop.value for prop in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**existing, **props})
    check_exported(proto)
    partial = path.with_name(path.name + ".meta.partial")
    try:
        onnx.save(proto, str(partial))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file."""
    return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}


def load_inputs(paths: Sequence[Path], config: PreprocessConfig) -> np.ndarray:
    """The model inputs (N, 3, size, size) of image files, preprocessed exactly as the service does."""
    return preprocess_batch(paths, config)


def _batches(inputs: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(inputs), batch_size):
        yield inputs[start : start + batch_size]


def path_batches(paths: Sequence[Path], config: PreprocessConfig, batch_size: int) -> Iterator[np.ndarray]:
    """Model inputs of image files, `batch_size` at a time (bounded memory for whole splits)."""
    for start in range(0, len(paths), batch_size):
        yield load_inputs(paths[start : start + batch_size], config)


def onnx_probabilities(sess: ort.InferenceSession, batches: Iterable[np.ndarray]) -> np.ndarray:
    """Class probabilities (N, classes) from onnxruntime."""
    out = [sess.run([OUTPUT_NAMES[0]], {INPUT_NAME: batch})[0] for batch in batches]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)


def torch_probabilities(model: nn.Module, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (N, classes) from the PyTorch model in fp32."""
    model = as_fp32(model)
    out = [predict_proba(model, torch.from_numpy(batch)).numpy() for batch in _batches(inputs, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)


def parity_difference(model: nn.Module, sess: ort.InferenceSession, inputs: np.ndarray) -> float:
    """The largest absolute difference between PyTorch's and onnxruntime's probabilities."""
    if len(inputs) == 0:
        raise CatdogError("no images for the ONNX parity check")
    onnx_probs = onnx_probabilities(sess, _batches(inputs, 32))
    return float(np.abs(torch_probabilities(model, inputs) - onnx_probs).max())


def check_parity(difference: float, tolerance: float, images: int, what: str = "P") -> None:
    """Fail (QualityGateError) when the ONNX model's probabilities (or score) drift from PyTorch's."""
    if not difference <= tolerance:
        raise QualityGateError(
            f"ONNX parity failed: max |{what}_onnx - {what}_torch| = {difference:.3g} on {images} test "
            f"images exceeds export.parity_tolerance {tolerance:g}"
        )


def onnx_scores(sess: ort.InferenceSession, batches: Iterable[np.ndarray]) -> np.ndarray:
    """The out-of-distribution scores (N,) from onnxruntime (the model must have the output)."""
    out = [sess.run([SCORE_NAME], {INPUT_NAME: batch})[0] for batch in batches]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def torch_scores(model: nn.Module, head: nn.Module, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The out-of-distribution scores (N,) from PyTorch in fp32 (catdog.ood, as the export wrapper)."""
    batches = (torch.from_numpy(batch) for batch in _batches(inputs, batch_size))
    return ood.probabilities_and_scores(as_fp32(model), head.float().eval(), batches)[1]


def score_parity_difference(
    model: nn.Module, head: nn.Module, sess: ort.InferenceSession, inputs: np.ndarray
) -> float:
    """The largest absolute difference between PyTorch's and onnxruntime's pet scores."""
    if len(inputs) == 0:
        raise CatdogError("no images for the ONNX parity check")
    onnx_values = onnx_scores(sess, _batches(inputs, 32))
    return float(np.abs(torch_scores(model, head, inputs) - onnx_values).max())


def _timed(sess: ort.InferenceSession, batch: np.ndarray, runs: int) -> np.ndarray:
    """Seconds per run of `batch`, after one warm-up run."""
    feed = {INPUT_NAME: batch}
    sess.run([OUTPUT_NAMES[0]], feed)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run([OUTPUT_NAMES[0]], feed)
        seconds.append(time.perf_counter() - start)
    return np.asarray(seconds)


def benchmark(sess: ort.InferenceSession, inputs: np.ndarray, runs: int, batch_size: int) -> dict[str, float]:
    """Single-image latency (median, p95 in ms over `runs`) and images/second at `batch_size`."""
    single = _timed(sess, inputs[:1], runs) * 1000
    batch = np.resize(inputs, (batch_size, *inputs.shape[1:]))
    batch_seconds = _timed(sess, batch, max(3, runs // 10))
    return {
        "latency_ms_median": round(float(np.median(single)), 3),
        "latency_ms_p95": round(float(np.percentile(single, 95)), 3),
        "batch_size": batch_size,
        "images_per_second": round(batch_size / float(np.median(batch_seconds)), 1),
    }


def sample(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """At most `limit` items: a seeded random subset in the original order (all when `limit` is None)."""
    if limit is None or len(items) <= limit:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def image_rows(
    paths: Sequence[Path], config: PreprocessConfig, originals: Sequence[tuple[int, int] | None]
) -> list[dict[str, float]]:
    """image_properties of each picture as the model sees it; size properties only where the original's
    width and height are known."""
    rows = []
    for path, original in zip(paths, originals, strict=True):
        props = image_stats.image_properties(decode(path, size=config.size, resize=config.resize), original)
        rows.append(props if original else {k: v for k, v in props.items() if k not in SIZE_PROPERTIES})
    return rows


def prediction_reference(probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Reference distributions of the model's confidence (max probability) and P(dog), and class shares."""
    dog = class_names.index("dog")
    rows = [{"confidence": float(p.max()), "p_dog": float(p[dog])} for p in probabilities]
    predicted = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, dtype=int)
    share = {
        name: float((predicted == i).mean()) if len(predicted) else 0.0 for i, name in enumerate(class_names)
    }
    return {
        "count": len(rows),
        "statistics": image_stats.reference_statistics(rows),
        "predicted_share": share,
    }


def model_size_mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 3)


def write_json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")

"""Static int8 quantization of the exported fp32 ONNX model with onnxruntime (QDQ format), and the check of
what it costs in accuracy.

The int8 model keeps the fp32 model's contract: input `image` float32, outputs `probabilities` and `logits`
float32 (and `pet_score`, the out-of-distribution score, when the fp32 model has it). QuantizeLinear /
DequantizeLinear pairs around the backbone's operators carry int8 weights and activation scales (calibrated
on training images preprocessed exactly as served); onnxruntime's CPU kernels fuse them into integer
convolutions. The classifier head (the nodes producing the graph outputs) and the softmax and sums of
`pet_score` stay fp32, so neither the probabilities nor the score are rounded to 8 bits.

Torch-free: NumPy, onnx, onnxruntime, catdog.preprocessing and catdog.metrics only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from catdog import metrics as classification
from catdog.errors import CatdogError
from catdog.onnx_model import INPUT_NAME
from catdog.preprocessing import PreprocessConfig, preprocess_batch

FORMAT = "QDQ"
WEIGHT_TYPE = QuantType.QInt8
# uint8 activations: onnxruntime's x86 kernels fuse uint8 x int8 (VNNI) convolutions; with int8 activations
# the lite0 model ran at 0.6x the fp32 speed instead of 2.3x, for the same test accuracy.
ACTIVATION_TYPE = QuantType.QUInt8
CALIBRATION_BATCH = 16
SKIPPED_ADVICE = "Please consider"


class ImageCalibrationReader(CalibrationDataReader):
    """Calibration inputs for onnxruntime: image files preprocessed as served, `batch_size` at a time."""

    def __init__(self, paths: Sequence[Path], config: PreprocessConfig, batch_size: int = CALIBRATION_BATCH):
        self.paths = list(paths)
        self.config = config
        self.batch_size = batch_size
        self._batches: Iterator[np.ndarray] = iter(())
        self.rewind()

    def _generate(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.paths), self.batch_size):
            yield preprocess_batch(self.paths[start : start + self.batch_size], self.config)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._batches = self._generate()


def _worth_showing(record: logging.LogRecord) -> bool:
    """Whether a root-logger record is kept: not onnxruntime's per-tensor INFO lines, nor its advice to run
    quant_pre_process (measured on lite0: it yields the same int8 model, as the exporter already folds
    BatchNorm and infers shapes)."""
    return record.levelno >= logging.WARNING and not record.getMessage().startswith(SKIPPED_ADVICE)


@contextmanager
def _quiet() -> Iterator[None]:
    """Drop onnxruntime.quantization's chatter, which it logs on the root logger, for the duration."""
    root = logging.getLogger()
    root.addFilter(_worth_showing)
    try:
        yield
    finally:
        root.removeFilter(_worth_showing)


def symmetric(activation_type: QuantType) -> bool:
    """Signed int8 activations get a zero point of 0 (symmetric ranges); uint8 ones an asymmetric range."""
    return activation_type is QuantType.QInt8


# Operators between a classifier layer and a graph output: softmax, and the out-of-distribution score's
# slice / sum / add over the ImageNet softmax (catdog.ood).
HEAD_TAIL_OPS = {"Softmax", "Identity", "Slice", "ReduceSum", "Add"}


def head_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept in fp32: those that produce the graph's outputs (the binary classifier layer,
    whose logits are an output, and the softmax) and the softmax / slice / sum / add of `pet_score`. The
    ImageNet layer feeding `pet_score` gets int8 weights like the backbone (fp32, it would add 5 MB to the
    int8 file); its probabilities are never rounded to 8 bits."""
    outputs = {output.name for output in proto.graph.output}
    producers = {name: node for node in proto.graph.node for name in node.output}
    head, pending = [], list(outputs)
    while pending:
        name = pending.pop()
        node = producers.get(name)
        if node is None or node.name in head:
            continue
        if node.op_type in HEAD_TAIL_OPS:
            head.append(node.name)
            pending.extend(node.input)
        elif name in outputs:
            head.append(node.name)
    return head


def quantize_int8(
    source: Path,
    target: Path,
    reader: CalibrationDataReader,
    per_channel: bool,
    activation_type: QuantType = ACTIVATION_TYPE,
) -> None:
    """Write the static int8 QDQ model of the fp32 ONNX file `source` to `target` (self-contained).

    Raises CatdogError naming the cause when onnxruntime cannot quantize the model.
    """
    try:
        with _quiet():
            quantize_static(
                str(source),
                str(target),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=activation_type,
                weight_type=WEIGHT_TYPE,
                nodes_to_exclude=head_nodes(onnx.load(str(source), load_external_data=False)),
                extra_options={"ActivationSymmetric": symmetric(activation_type)},
            )
    except Exception as exc:
        target.unlink(missing_ok=True)
        raise CatdogError(f"int8 quantization of {source} failed: {type(exc).__name__}: {exc}") from exc


def figures(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy and log loss of class probabilities (N, classes)."""
    scores = classification.classification_metrics(y_true, probabilities)
    return {"accuracy": round(scores["accuracy"], 6), "log_loss": round(scores["log_loss"], 6)}


def comparison(
    y_true: np.ndarray, fp32: np.ndarray, int8: np.ndarray, max_accuracy_drop: float
) -> dict[str, Any]:
    """fp32 vs int8 on the same images: accuracy, log loss, drop in points, and whether int8 is approved."""
    before, after = figures(y_true, fp32), figures(y_true, int8)
    drop = round((before["accuracy"] - after["accuracy"]) * 100, 4)
    return {
        "test_images": len(y_true),
        "fp32": before,
        "int8": after,
        "accuracy_drop_points": drop,
        "max_accuracy_drop": max_accuracy_drop,
        "max_abs_prob_diff": round(float(np.abs(fp32 - int8).max()), 6) if len(y_true) else 0.0,
        "approved": bool(drop <= max_accuracy_drop),
    }


def settings(per_channel: bool, calibration_images: int) -> dict[str, Any]:
    """How the int8 model was made, as metrics/export.json records it."""
    return {
        "calibration_images": calibration_images,
        "per_channel": per_channel,
        "format": FORMAT,
        "weight_type": WEIGHT_TYPE.name,
        "activation_type": ACTIVATION_TYPE.name,
        "activation_symmetric": symmetric(ACTIVATION_TYPE),
        "calibration_method": "MinMax",
    }


def summary(block: Mapping[str, Any]) -> dict[str, Any]:
    """The quantization figures stored in the ONNX metadata `metrics`."""
    if not block.get("enabled"):
        return {"enabled": False}
    return {
        "approved": block["approved"],
        "accuracy_drop_points": block["accuracy_drop_points"],
        "max_accuracy_drop": block["max_accuracy_drop"],
        "int8": block["int8"],
    }

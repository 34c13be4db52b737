"""The exported model's contract, importable without torch: tensor names, file names, session, metadata.

onnxruntime is imported only to open a session, so the file names cost nothing to import.

Used by the export stage (which writes the files) and the prediction service (which reads them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort

INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "logits")
# Optional third output (models with an ImageNet head): the out-of-distribution score, (batch,) float32 in
# [0, 1]; metadata key OOD_KEY holds {"output", "threshold", "definition", ...}. Below the threshold the
# picture does not look like a cat or a dog (flag false = out of distribution).
SCORE_NAME = "pet_score"
OOD_KEY = "ood"
PROVIDERS = ["CPUExecutionProvider"]
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CARD_FILE = "model_card.md"
REFERENCE_FILE = "reference_stats.json"


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for an exported model (`threads` intra-op threads; None = all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep instead of spinning: the service decodes uploads on the same cores
    # (measured on 2 cores: c=32 throughput 45-47 -> 61-87 req/s with other work running; benchmarks/).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=PROVIDERS)


def metadata(sess: ort.InferenceSession) -> dict[str, str]:
    """The metadata_props the export stage stored in the model (labels, preprocessing, lineage...)."""
    return dict(sess.get_modelmeta().custom_metadata_map)


def metadata_json(meta: dict[str, str], key: str, default: object = None) -> object:
    """A JSON-encoded metadata value, `default` when it is absent."""
    return json.loads(meta[key]) if key in meta else default


def probabilities(sess: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """Class probabilities (N, classes) of one (N, 3, size, size) float32 batch."""
    return sess.run([OUTPUT_NAMES[0]], {INPUT_NAME: batch})[0]


def has_score(sess: ort.InferenceSession) -> bool:
    """Whether the model has the out-of-distribution score output."""
    return SCORE_NAME in {node.name for node in sess.get_outputs()}


def ood_threshold(sess: ort.InferenceSession) -> float | None:
    """The calibrated score threshold in the metadata, when the model has the score output and one."""
    if not has_score(sess):
        return None
    spec = metadata_json(metadata(sess), OOD_KEY, None)
    if not isinstance(spec, dict) or not isinstance(spec.get("threshold"), int | float):
        return None
    return float(spec["threshold"])


def predict(
    sess: ort.InferenceSession, batch: np.ndarray, scored: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (N, classes) and, when `scored`, the pet scores (N,), from one model run."""
    if not scored:
        return probabilities(sess, batch), None
    probs, score = sess.run([OUTPUT_NAMES[0], SCORE_NAME], {INPUT_NAME: batch})
    return probs, score

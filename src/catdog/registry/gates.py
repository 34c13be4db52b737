"""The five promotion gates. Each returns a GateResult (passed, skipped, why, the figures); none raises."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catdog import export, metrics, onnx_model, smoke
from catdog.config import CLASSES, GateParams
from catdog.preprocessing import PreprocessConfig


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else "passed" if self.passed else "failed"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


@dataclass
class OnnxModel:
    """A downloaded model version: its session, metadata and preprocessing recipe."""

    path: Path
    session: Any
    metadata: dict[str, str]
    config: PreprocessConfig

    @classmethod
    def load(cls, folder: Path) -> OnnxModel:
        path = folder / onnx_model.FP32_FILE
        session = onnx_model.session(path)
        meta = onnx_model.metadata(session)
        return cls(path, session, meta, PreprocessConfig.from_json(meta["preprocessing"]))


def evaluate(model: OnnxModel, paths: list[Path], y: np.ndarray, batch_size: int = 32) -> dict[str, float]:
    """Test-split metrics of an ONNX model (fp32, onnxruntime), inputs preprocessed by the shared module."""
    probabilities = export.onnx_probabilities(
        model.session, export.path_batches(paths, model.config, batch_size)
    )
    return metrics.classification_metrics(y, probabilities)


def metrics_gate(found: dict[str, float], gates: GateParams) -> GateResult:
    """1. Accuracy, F1 and log loss on the test split meet the absolute thresholds."""
    problems = []
    if found["accuracy"] < gates.min_accuracy:
        problems.append(f"accuracy {found['accuracy']:.4f} < {gates.min_accuracy}")
    if found["f1"] < gates.min_f1:
        problems.append(f"F1 {found['f1']:.4f} < {gates.min_f1}")
    if found["log_loss"] > gates.max_log_loss:
        problems.append(f"log loss {found['log_loss']:.4f} > {gates.max_log_loss}")
    summary = f"accuracy {found['accuracy']:.4f}, F1 {found['f1']:.4f}, log loss {found['log_loss']:.4f}"
    return GateResult("metrics", not problems, "; ".join(problems) or summary, dict(found))


def regression_gate(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    champion_version: str | None,
    gates: GateParams,
) -> GateResult:
    """2. Not worse than the champion on the same test split by more than the margins."""
    if champion is None:
        return GateResult("no_regression", True, "no champion yet: nothing to compare with", skipped=True)
    drop = champion["accuracy"] - challenger["accuracy"]
    increase = challenger["log_loss"] - champion["log_loss"]
    problems = []
    if drop > gates.max_accuracy_drop:
        problems.append(
            f"accuracy {drop:.4f} below champion v{champion_version} (margin {gates.max_accuracy_drop})"
        )
    if increase > gates.max_log_loss_increase:
        problems.append(
            f"log loss {increase:.4f} above champion v{champion_version} "
            f"(margin {gates.max_log_loss_increase})"
        )
    values = {
        "champion_version": champion_version,
        "champion": champion,
        "accuracy_drop": drop,
        "log_loss_increase": increase,
    }
    summary = f"vs champion v{champion_version}: accuracy {-drop:+.4f}, log loss {increase:+.4f}"
    return GateResult("no_regression", not problems, "; ".join(problems) or summary, values)


def _dims(node: Any) -> list[Any]:
    return list(node.shape)


def schema_gate(model: OnnxModel) -> GateResult:
    """3. The input/output signature and label set the service expects."""
    inputs = {node.name: node for node in model.session.get_inputs()}
    outputs = {node.name: node for node in model.session.get_outputs()}
    size = model.config.size
    problems = []
    image = inputs.get(onnx_model.INPUT_NAME)
    if image is None:
        problems.append(f"no input {onnx_model.INPUT_NAME!r} (has {sorted(inputs)})")
    else:
        if image.type != "tensor(float)":
            problems.append(f"input type {image.type}, expected tensor(float)")
        if _dims(image)[1:] != [3, size, size] or isinstance(_dims(image)[0], int):
            problems.append(f"input shape {_dims(image)}, expected [batch, 3, {size}, {size}]")
    probabilities = outputs.get(onnx_model.OUTPUT_NAMES[0])
    if probabilities is None:
        problems.append(f"no output {onnx_model.OUTPUT_NAMES[0]!r} (has {sorted(outputs)})")
    elif _dims(probabilities)[1:] != [len(CLASSES)]:
        problems.append(f"output shape {_dims(probabilities)}, expected [batch, {len(CLASSES)}]")
    labels = json.loads(model.metadata.get("labels", "[]"))
    if sorted(labels) != sorted(CLASSES):
        problems.append(f"labels {labels}, expected {list(CLASSES)}")
    values = {
        "inputs": {k: _dims(v) for k, v in inputs.items()},
        "outputs": {k: _dims(v) for k, v in outputs.items()},
        "labels": labels,
    }
    return GateResult(
        "schema",
        not problems,
        "; ".join(problems)
        or f"image [batch, 3, {size}, {size}] -> probabilities [batch, {len(CLASSES)}], labels {labels}",
        values,
    )


def latency_gate(model: OnnxModel, inputs: np.ndarray, gates: GateParams) -> GateResult:
    """4. p95 single-image onnxruntime latency on this CPU within the budget."""
    speed = export.benchmark(model.session, inputs, gates.latency_runs, batch_size=1)
    p95 = speed["latency_ms_p95"]
    passed = p95 <= gates.max_latency_ms_p95
    detail = (
        f"p95 {p95:.2f} ms {'<=' if passed else '>'} budget {gates.max_latency_ms_p95} ms (median "
        f"{speed['latency_ms_median']:.2f} ms, {gates.latency_runs} runs)"
    )
    return GateResult("latency", passed, detail, speed)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def staging_service(model_uri: str, tracking_uri: str, log_file: Path) -> Iterator[str]:
    """The prediction service in a process of its own on a free loopback port, serving `model_uri`."""
    port = free_port()
    env = {
        **os.environ,
        "MODEL_URI": model_uri,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "ADMIN_API_KEY": "",
        "MODEL_POLL_SECONDS": "0",
        "LOG_LEVEL": "info",
    }
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def smoke_gate(
    model_uri: str,
    version: str,
    tracking_uri: str,
    cases: list[tuple[Path, str]],
    timeout: float,
    log_file: Path,
) -> GateResult:
    """5. Staging: the service serving `model_uri` gets ready, labels known images right, has sane metrics."""
    if not cases:
        return GateResult(
            "staging_smoke",
            False,
            "no smoke images: run the evaluate stage first "
            "(reports/evaluate/predictions.csv) or lower smoke_min_confidence",
        )
    with staging_service(model_uri, tracking_uri, log_file) as url:
        result = smoke.run(url, cases, timeout, expect_version=version)
    failures = result.failures()
    detail = "; ".join(failures) if failures else f"{model_uri} served {len(cases)} images right"
    return GateResult("staging_smoke", result.passed, detail, {"checks": result.checks, "log": str(log_file)})

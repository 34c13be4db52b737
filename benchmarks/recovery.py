"""How fast the service notices a broken inference and recovers: /ready 503, then 200 again.

The service runs `faulty_model`, a tiny ONNX model that meets the service's contract (input `image`, outputs
`probabilities` and `logits`, labels and preprocessing in its metadata) and answers normally, except on three
kinds of picture: all white (one row short: the answer the old inference loop died of), all black (an
onnxruntime error) and all red (a busy loop of `spin` iterations: a hung call). No hook in the service: the
same `python -m api` as in production.

For each kind the script sends the picture, then polls /ready every 5 ms and prints the time from sending to
the first 503 and from sending to the next 200 (the canary, INFERENCE_PROBE_SECONDS later, found the model
answering again; no other request is sent). Run from the repository root:

    .venv/bin/python -m benchmarks.recovery [--rounds 5] [--timeout 1] [--probe 1]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from benchmarks.service import free_port, start, stop

# One spin of the busy loop takes about 5 us on a 2-core EPYC VM: 1.2 million is about 6 s of one core.
SPIN = 1_200_000
ADMIN_KEY = "recovery-benchmark"
COLOURS = {"gray": (128, 128, 128), "white": (255, 255, 255), "black": (0, 0, 0), "red": (255, 0, 0)}
FAULTS = {"white": "one row short", "black": "onnxruntime error", "red": "hung call"}


def faulty_model(path: Path, spin: int = SPIN, size: int = 32) -> Path:
    """Write the faulty model (see the module docstring) to `path`; the batch's mean red and green values
    (pixels / 255, mean 0 and std 1 in its preprocessing) decide: both > 0.9 one row short, both < 0.1 an
    error, red > 0.9 and green < 0.1 `spin` iterations of a Loop. P(cat) = softmax of the image's mean."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as h

    def const(name: str, value: object, dtype: int = TensorProto.FLOAT) -> onnx.NodeProto:
        tensor = h.make_tensor(name, dtype, np.shape(value), np.ravel(value).tolist())
        return h.make_node("Constant", [], [name], value=tensor)

    i64, boolean = TensorProto.INT64, TensorProto.BOOL
    constants = [
        const("i0", 0, i64),
        const("i1", 1, i64),
        const("hi", 0.9),
        const("lo", 0.1),
        const("zero", 0.0),
        const("spins", spin, i64),
        const("no_spins", 0, i64),
        const("rows", [-1, 2], i64),
        const("bad_rows", [-1, 7], i64),
        const("column", [-1, 1], i64),
        const("axis0", [0], i64),
        const("start0", [0], i64),
    ]
    spin_body = h.make_graph(
        [
            const("one", 1.0),
            h.make_node("Identity", ["c_in"], ["c_out"]),
            h.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "spin",
        [
            h.make_tensor_value_info("i", i64, []),
            h.make_tensor_value_info("c_in", boolean, []),
            h.make_tensor_value_info("v_in", TensorProto.FLOAT, []),
        ],
        [
            h.make_tensor_value_info("c_out", boolean, []),
            h.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
        ],
    )
    nodes = [
        h.make_node("ReduceMean", ["image"], ["channels"], axes=[0, 2, 3], keepdims=0),
        h.make_node("Gather", ["channels", "i0"], ["red"]),
        h.make_node("Gather", ["channels", "i1"], ["green"]),
        h.make_node("Greater", ["red", "hi"], ["red_hi"]),
        h.make_node("Less", ["red", "lo"], ["red_lo"]),
        h.make_node("Greater", ["green", "hi"], ["green_hi"]),
        h.make_node("Less", ["green", "lo"], ["green_lo"]),
        h.make_node("And", ["red_hi", "green_hi"], ["white"]),
        h.make_node("And", ["red_lo", "green_lo"], ["black"]),
        h.make_node("And", ["red_hi", "green_lo"], ["hang"]),
        h.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=1),
        h.make_node("Reshape", ["mean", "column"], ["feature"]),
        h.make_node("Neg", ["feature"], ["negated"]),
        h.make_node("Concat", ["feature", "negated"], ["logits"], axis=1),
        h.make_node("Softmax", ["logits"], ["softmax"], axis=1),
        h.make_node("Shape", ["softmax"], ["shape"]),
        h.make_node("Gather", ["shape", "axis0"], ["batch"]),
        h.make_node("Cast", ["white"], ["missing"], to=i64),
        h.make_node("Sub", ["batch", "missing"], ["end"]),
        h.make_node("Slice", ["softmax", "start0", "end", "axis0"], ["sliced"]),
        h.make_node("Where", ["black", "bad_rows", "rows"], ["target"]),
        h.make_node("Reshape", ["sliced", "target"], ["reshaped"]),
        h.make_node("Where", ["hang", "spins", "no_spins"], ["trips"]),
        h.make_node("Loop", ["trips", "", "zero"], ["spun"], body=spin_body),
        h.make_node("Mul", ["spun", "zero"], ["nothing"]),
        h.make_node("Add", ["reshaped", "nothing"], ["probabilities"]),
    ]
    graph = h.make_graph(
        constants + nodes,
        "faulty",
        [h.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [
            h.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["M", 2]),
            h.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2]),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    metadata = {
        "labels": json.dumps(["cat", "dog"]),
        "preprocessing": json.dumps(
            {"size": size, "resize": "center_crop", "mean": [0, 0, 0], "std": [1, 1, 1]}
        ),
        "model_name": "faulty",
    }
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def picture(colour: str) -> bytes:
    """A 64x64 PNG of one colour of COLOURS."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def post_picture(url: str, colour: str, timeout: float = 60) -> int:
    """POST /predict with the picture; the HTTP status."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{colour}.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + picture(colour)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "/predict", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def hung_threads(url: str, key: str) -> int:
    """Abandoned model calls still running (GET /admin/status)."""
    request = urllib.request.Request(url + "/admin/status", headers={"X-API-Key": key})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)["inference"]["abandoned_threads"]


def one_round(url: str, colour: str, limit: float = 120) -> tuple[int, float, float]:
    """(the request's status, seconds from sending it to /ready 503, to /ready 200 again)."""
    sent = time.perf_counter()
    answered = post_picture(url, colour)
    unready = ready = None
    while time.perf_counter() - sent < limit:
        code = status(url + "/ready")
        now = time.perf_counter() - sent
        if code == 503 and unready is None:
            unready = now
        if code == 200 and unready is not None:
            ready = now
            break
        time.sleep(0.005)
    if unready is None or ready is None:
        raise RuntimeError(f"{colour}: /ready did not go 503 and back to 200 within {limit} s")
    return answered, unready, ready


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1.0, help="INFERENCE_TIMEOUT_SECONDS")
    parser.add_argument("--probe", type=float, default=1.0, help="INFERENCE_PROBE_SECONDS")
    parser.add_argument("--spin", type=int, default=SPIN)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="catdog-recovery-") as folder:
        model = faulty_model(Path(folder) / "model.onnx", args.spin)
        port = free_port()
        env = {
            "MODEL_URI": str(model),
            "INFERENCE_TIMEOUT_SECONDS": str(args.timeout),
            "INFERENCE_PROBE_SECONDS": str(args.probe),
            "INFERENCE_MAX_HUNG_THREADS": str(args.rounds + 1),
            "FEEDBACK_DB": "",
            "LOG_LEVEL": "warning",
            "ADMIN_API_KEY": ADMIN_KEY,
        }
        service = start([sys.executable, "-m", "api"], Path(folder) / "server.log", env, port)
        try:
            print(f"INFERENCE_TIMEOUT_SECONDS={args.timeout:g}, INFERENCE_PROBE_SECONDS={args.probe:g}\n")
            print(
                "| fault | answer | sent → /ready 503 (median, max) | sent → /ready 200 again (median, max) |"
            )
            print("| --- | --- | --- | --- |")
            for colour, fault in FAULTS.items():
                rounds = []
                for _ in range(args.rounds):
                    rounds.append(one_round(service.url, colour))
                    # A hung call keeps a core busy until it ends: let it end before the next round.
                    while hung_threads(service.url, ADMIN_KEY):
                        time.sleep(0.1)
                answers = sorted({answer for answer, _, _ in rounds})
                down = [seconds * 1000 for _, seconds, _ in rounds]
                up = [seconds for _, _, seconds in rounds]
                print(
                    f"| {fault} ({colour}) | {', '.join(map(str, answers))} | "
                    f"{statistics.median(down):.1f} ms, {max(down):.1f} ms | "
                    f"{statistics.median(up):.2f} s, {max(up):.2f} s |"
                )
            print(f"\nafter: a good picture answers {post_picture(service.url, 'gray')}")
        finally:
            stop(service.process)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

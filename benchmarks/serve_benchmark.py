"""Serving benchmark: the prediction service under closed-loop load, against two baselines from the same run.

On the same real JPEGs of the shared sample it measures:

* the service as deployed (`python -m api`; fp32, and int8 too when an approved model.int8.onnx sits beside
  the model): throughput and p50/p95/p99 latency at each concurrency, spawn-to-ready time, resident memory
  after the load, and /health latency while the highest concurrency runs;
* the ceiling: the bare ONNX Runtime session in this process on the same preprocessed tensors, the best
  images/s over batch sizes 1..32 (per precision);
* a naive baseline: FastAPI + the PyTorch eager model called inside an `async def` handler, one image per
  call (this script with `--naive-app`), driven exactly like the service.

The machine is shared, so every step first waits for other processes to go quiet (--quiet-below cores) and a
step they disturbed anyway is measured again (--retries); the tables show the cores each party kept busy.
The ceiling is measured before and after the servers and the better pass kept.

    python -m benchmarks.serve_benchmark --model models/model.onnx --checkpoint models/model.ckpt \
        --out benchmarks/results/serve

prints a markdown table; `--out PATH` also writes it to PATH.md and the figures to PATH.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, UploadFile

from benchmarks import service
from benchmarks.http_load import LoadResult, Request, percentiles, probe, run_load, upload
from catdog import onnx_model
from catdog.preprocessing import ImageDecodeError, PreprocessConfig, preprocess

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
NAIVE = "naive FastAPI + PyTorch"
TUNING_ENV = ("BATCH_MAX_SIZE", "BATCH_MAX_WAIT_MS", "MAX_QUEUE", "INFERENCE_THREADS", "LOG_LEVEL")
Photo = tuple[str, bytes]


@dataclass
class ServerRun:
    """One server driven at every concurrency level."""

    ready_s: list[float]
    rss_mb: float
    levels: dict[int, LoadResult]
    cpu: dict[int, dict[str, float]]
    health_ms: list[float]
    other_load_before: float

    def summary(self) -> dict[str, Any]:
        return {
            "ready_s": round(float(np.median(self.ready_s)), 3),
            "ready_s_each": [round(seconds, 3) for seconds in self.ready_s],
            "rss_mb": round(self.rss_mb, 1),
            "health_under_load_ms": {**percentiles(self.health_ms), "samples": len(self.health_ms)},
            "other_load_before_cores": self.other_load_before,
            "levels": {
                str(level): {**result.summary(), "cpu": self.cpu[level]}
                for level, result in self.levels.items()
            },
        }


# --- inputs ---------------------------------------------------------------------------------------------


def load_photos(images: Path, count: int, config: PreprocessConfig) -> tuple[list[Photo], np.ndarray]:
    """Up to `count` real JPEGs (cats and dogs alternating, fixed order) that decode, and their tensors."""
    folders = [sorted((images / "PetImages" / name).glob("*.jpg")) for name in ("Cat", "Dog")]
    if not all(folders):
        raise SystemExit(f"no photos in {images}/PetImages/{{Cat,Dog}}: pass --images")
    photos: list[Photo] = []
    tensors: list[np.ndarray] = []
    for path in (path for pair in zip(*folders, strict=False) for path in pair):
        data = path.read_bytes()
        try:
            tensors.append(preprocess(data, config))
        except ImageDecodeError:
            continue
        photos.append((path.name, data))
        if len(photos) == count:
            break
    return photos, np.stack(tensors)


def predict_requests(photos: Sequence[Photo]) -> list[Request]:
    return [upload("photo", data, name) for name, data in photos]


def model_metadata(path: Path) -> dict[str, str]:
    return onnx_model.metadata(onnx_model.session(path, threads=1))


def approved_int8(model: Path) -> tuple[Path | None, str]:
    """The int8 model beside `model` when the export stage approved it, and what was found."""
    path = model.with_name(onnx_model.INT8_FILE)
    if not path.is_file():
        return None, f"no {path.name}"
    if model_metadata(path).get("int8_approved") != "true":
        return None, f"{path.name} is not approved by the export stage"
    return path, "approved"


# --- the ceiling: the bare session in-process -------------------------------------------------------------


def images_per_second(session: Any, tensors: np.ndarray, size: int, seconds: float) -> float:
    """Images/s of back-to-back `session` runs on batches of `size` preprocessed images."""
    batches = [np.ascontiguousarray(tensors[i : i + size]) for i in range(0, len(tensors) - size + 1, size)]
    onnx_model.probabilities(session, batches[0])
    runs = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        onnx_model.probabilities(session, batches[runs % len(batches)])
        runs += 1
    return runs * size / (time.perf_counter() - started)


def ceiling_pass(path: Path, tensors: np.ndarray, args: argparse.Namespace) -> dict[int, tuple[float, float]]:
    """(images/s, cores other processes kept busy) per batch size, for a session opened as the service opens
    it (an intra-op thread per core); a size disturbed by others is measured again (up to --retries times)."""
    session = onnx_model.session(path, threads=len(os.sched_getaffinity(0)))
    found: dict[int, tuple[float, float]] = {}
    for size in BATCH_SIZES:
        for attempt in range(args.retries + 1):
            before = service.cpu_sample()
            rate = images_per_second(session, tensors, size, args.ceiling_seconds)
            found[size] = (round(rate, 1), service.cpu_usage(before, service.cpu_sample())["other_cores"])
            if found[size][1] < args.quiet_below or attempt == args.retries:
                break
            service.wait_quiet(args.quiet_below, args.quiet_timeout)
    return found


def ceiling(passes: Sequence[dict[int, tuple[float, float]]]) -> dict[str, Any]:
    """The ceiling: per batch size the best of the passes (one before the servers run, one after)."""
    by_size = {size: max(found[size][0] for found in passes) for size in BATCH_SIZES}
    best = max(by_size, key=by_size.__getitem__)
    return {
        "images_per_s": {str(size): rate for size, rate in by_size.items()},
        "best": by_size[best],
        "best_batch": best,
        "passes": [{str(size): rate for size, (rate, _) in found.items()} for found in passes],
        "other_cores": max(other for found in passes for _, other in found.values()),
    }


# --- driving a server -------------------------------------------------------------------------------------


async def measure_level(
    url: str, pid: int, requests: Sequence[Request], level: int, health: bool, args: argparse.Namespace
) -> tuple[LoadResult, dict[str, float], list[float]]:
    """One concurrency level (with /health probed alongside when `health`); measured again (up to --retries
    times) when other processes kept more than --quiet-below cores busy meanwhile."""
    for attempt in range(args.retries + 1):
        before = service.cpu_sample(pid)
        loads = [run_load(url, requests, level, args.seconds)]
        if health:
            loads.append(probe(url, "/health", args.seconds))
        result, *probed = await asyncio.gather(*loads)
        cpu = service.cpu_usage(before, service.cpu_sample(pid))
        if cpu["other_cores"] < args.quiet_below or attempt == args.retries:
            break
        await asyncio.to_thread(service.wait_quiet, args.quiet_below, args.quiet_timeout)
    return result, {**cpu, "attempts": attempt + 1}, probed[0] if probed else []


async def drive(
    url: str, pid: int, requests: Sequence[Request], args: argparse.Namespace
) -> tuple[dict[int, LoadResult], dict[int, dict[str, float]], list[float]]:
    """A warm-up, then each concurrency level in turn; /health is probed while the highest one runs."""
    top = max(args.concurrency)
    await run_load(url, requests, max(1, top // 4), args.warmup)
    results: dict[int, LoadResult] = {}
    cpu: dict[int, dict[str, float]] = {}
    health: list[float] = []
    for level in args.concurrency:
        results[level], cpu[level], probed = await measure_level(
            url, pid, requests, level, level == top, args
        )
        health = probed or health
    return results, cpu, health


def measure_server(
    command: Callable[[int], list[str]],
    env: dict[str, str],
    log: Path,
    requests: Sequence[Request],
    args: argparse.Namespace,
) -> ServerRun:
    """Start a server (`command(port)`) --starts times for its start-up time (the median), drive the last
    one at every level, read its memory, stop it."""
    load_before = service.wait_quiet(args.quiet_below, args.quiet_timeout)
    ready: list[float] = []
    for _ in range(args.starts - 1):
        port = service.free_port()
        running = service.start(command(port), log, env, port)
        service.stop(running.process)
        ready.append(running.ready_s)
    port = service.free_port()
    running = service.start(command(port), log, env, port)
    ready.append(running.ready_s)
    try:
        levels, cpu, health = asyncio.run(drive(running.url, running.process.pid, requests, args))
        rss = running.rss_mb()
    finally:
        service.stop(running.process)
    return ServerRun(ready, rss, levels, cpu, health, load_before)


def service_command(_port: int) -> list[str]:
    """The service as deployed: `python -m api` (uvicorn, no access log; HOST and PORT from the env)."""
    return [sys.executable, "-m", "api"]


def naive_command(checkpoint: Path) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "benchmarks.serve_benchmark",
            "--naive-app",
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(port),
        ]

    return command


# --- the naive baseline -----------------------------------------------------------------------------------


def naive_app(checkpoint: Path) -> FastAPI:
    """FastAPI + the PyTorch eager model called inside an `async def` handler, one image per call."""
    import torch

    from catdog.training.checkpoint import load_classifier, predict_proba

    model, config, labels = load_classifier(checkpoint)
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/predict")
    async def predict(file: UploadFile) -> dict[str, Any]:
        image = torch.from_numpy(preprocess(await file.read(), config))[None]
        probabilities = predict_proba(model, image)[0].tolist()
        best = int(np.argmax(probabilities))
        return {"label": labels[best], "probabilities": dict(zip(labels, probabilities, strict=True))}

    return app


def serve_naive(checkpoint: Path, port: int) -> None:
    import uvicorn

    uvicorn.run(naive_app(checkpoint), host="127.0.0.1", port=port, access_log=False, log_level="warning")


# --- the report -------------------------------------------------------------------------------------------


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, OS and the versions that matter."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "")
    meminfo = Path("/proc/meminfo").read_text().split()
    try:
        system = platform.freedesktop_os_release()["PRETTY_NAME"]
    except OSError:
        system = platform.platform()
    return {
        "cpu": model or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "ram_gb": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024**2, 1),
        "os": f"{system}, Linux {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": _package("onnxruntime"),
        "torch": _package("torch"),
        "load_avg_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def _target(name: str, measured: float | None, goal: str, met: Callable[[float], bool], unit: str) -> dict:
    value = None if measured is None or np.isnan(measured) else round(measured, 2)
    return {
        "target": name,
        "measured": "not measured" if value is None else f"{value}{unit}",
        "goal": goal,
        "met": None if value is None else bool(met(value)),
    }


def targets(report: dict[str, Any], precision: str) -> list[dict[str, Any]]:
    """The issue's targets for the service at one precision, against baselines from the same run."""
    run = report["servers"].get(f"service {precision}")
    if run is None:
        return []
    levels = run["levels"]
    top = str(max(int(level) for level in levels))
    throughput = levels[top]["throughput_rps"]
    naive = report["servers"].get(NAIVE, {}).get("levels", {}).get(top)
    ceiling = report["ceiling"][precision]["best"]
    p99_c8 = levels["8"]["latency_ms"]["p99"] if "8" in levels else None
    return [
        _target(
            f"{precision}: c={top} req/s ÷ naive c={top}",
            throughput / naive["throughput_rps"] if naive else None,
            ">= 5x",
            lambda v: v >= 5,
            "x",
        ),
        _target(
            f"{precision}: c={top} req/s ÷ bare ORT ceiling",
            100 * throughput / ceiling,
            ">= 60%",
            lambda v: v >= 60,
            "%",
        ),
        _target(f"{precision}: p99 latency at c=8", p99_c8, "< 50 ms", lambda v: v < 50, " ms"),
        _target(f"{precision}: spawn to first 200 /ready", run["ready_s"], "< 2 s", lambda v: v < 2, " s"),
        _target(f"{precision}: RSS after the load", run["rss_mb"], "< 300 MB", lambda v: v < 300, " MB"),
        _target(
            f"{precision}: /health p99 during c={top}",
            run["health_under_load_ms"]["p99"],
            "< 10 ms",
            lambda v: v < 10,
            " ms",
        ),
    ]


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(row) for row in rows)]


LEVEL_HEADER = ["server", "c", "req/s", "p50 ms", "p95 ms", "p99 ms", "not 200", "server CPU", "client CPU"]
SERVER_HEADER = ["server", "spawn → ready s", "RSS after load MB", "/health p50 ms", "/health p99 ms"]
MET = {True: "yes", False: "**no**", None: "–"}


def _level_table(report: dict[str, Any]) -> list[str]:
    """Throughput and latency per server and concurrency, with the cores each party kept busy."""
    rows = []
    for name, run in report["servers"].items():
        for level, figures in run["levels"].items():
            latency, cpu = figures["latency_ms"], figures["cpu"]
            failed = (
                figures["requests"]
                - figures["statuses"].get("200", 0)
                + sum(figures["client_errors"].values())
            )
            figures_row = [figures["throughput_rps"], latency["p50"], latency["p95"], latency["p99"], failed]
            rows.append(
                [name, level, *figures_row, cpu["server_cores"], cpu["client_cores"], cpu["other_cores"]]
            )
    return _table([*LEVEL_HEADER, "other CPU"], rows)


def _server_table(report: dict[str, Any]) -> list[str]:
    rows = []
    for name, run in report["servers"].items():
        health = run["health_under_load_ms"]
        facts = [run["ready_s"], run["rss_mb"], health["p50"], health["p99"], run["other_load_before_cores"]]
        rows.append([name, *facts])
    return _table([*SERVER_HEADER, "other load before (cores)"], rows)


def _ceiling_table(report: dict[str, Any]) -> list[str]:
    header = ["bare ORT ceiling", *(f"batch {size} img/s" for size in BATCH_SIZES), "best img/s", "other CPU"]
    rows = [
        [precision, *found["images_per_s"].values(), found["best"], found["other_cores"]]
        for precision, found in report["ceiling"].items()
    ]
    return _table(header, rows)


def _target_table(report: dict[str, Any]) -> list[str]:
    rows = [[t["target"], t["measured"], t["goal"], MET[t["met"]]] for t in report["targets"]]
    return _table(["target", "measured", "goal", "met"], rows)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the machine, then tables of load levels, server facts, ceiling, targets."""
    host = report["machine"]
    lines = [
        f"Machine: {host['cpu']}, {host['cores']} cores, {host['ram_gb']} GB RAM, {host['os']}; "
        f"Python {host['python']}, onnxruntime {host['onnxruntime']}, torch {host['torch']}; "
        f"load average at start {host['load_avg_at_start']}, at end {host.get('load_avg_at_end')}.",
        f"Settings: {report['settings']}; {'; '.join(report['notes'])}.",
    ]
    for table in (_level_table, _server_table, _ceiling_table, _target_table):
        lines += ["", *table(report)]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, one at a time: the ceilings, each server alone, the ceilings again."""
    report: dict[str, Any] = {"machine": machine(), "ceiling": {}, "servers": {}, "notes": []}
    config = PreprocessConfig.from_json(model_metadata(args.model)["preprocessing"])
    photos, tensors = load_photos(args.images, args.photos, config)
    requests = predict_requests(photos)
    int8, int8_status = approved_int8(args.model)
    report["notes"].append(f"int8: {int8_status}")
    report["settings"] = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "photos": len(photos),
        **{name: os.environ[name] for name in TUNING_ENV if name in os.environ},
    }
    precisions = {"fp32": args.model, **({"int8": int8} if int8 else {})}
    passes: dict[str, list[dict[int, tuple[float, float]]]] = {precision: [] for precision in precisions}
    for precision, path in precisions.items():
        print(f"ceiling {precision} ...", file=sys.stderr)
        service.wait_quiet(args.quiet_below, args.quiet_timeout)
        passes[precision].append(ceiling_pass(path, tensors, args))
    for precision in precisions:
        print(f"service {precision} ...", file=sys.stderr)
        env = {"MODEL_URI": str(args.model), "MODEL_PRECISION": precision}
        run = measure_server(service_command, env, args.logs / f"service-{precision}.log", requests, args)
        report["servers"][f"service {precision}"] = run.summary()
    if not args.skip_naive:
        print("naive baseline ...", file=sys.stderr)
        run = measure_server(naive_command(args.checkpoint), {}, args.logs / "naive.log", requests, args)
        report["servers"][NAIVE] = run.summary()
    for precision, path in precisions.items():
        print(f"ceiling {precision}, second pass ...", file=sys.stderr)
        service.wait_quiet(args.quiet_below, args.quiet_timeout)
        passes[precision].append(ceiling_pass(path, tensors, args))
        report["ceiling"][precision] = ceiling(passes[precision])
    report["targets"] = [target for precision in precisions for target in targets(report, precision)]
    report["machine"]["load_avg_at_end"] = [round(value, 2) for value in os.getloadavg()]
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"), help="the fp32 .onnx file")
    parser.add_argument(
        "--checkpoint", type=Path, default=Path("models/model.ckpt"), help="for the naive app"
    )
    parser.add_argument(
        "--images", type=Path, default=service.DEFAULT_IMAGES, help="holds PetImages/{Cat,Dog}"
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="of load per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unreported load first")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument("--photos", type=int, default=256, help="distinct real JPEGs sent in turn")
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.2,
        help="before each phase, wait until other processes use fewer cores",
    )
    parser.add_argument(
        "--quiet-timeout", type=float, default=180.0, help="longest wait for a quiet machine (s)"
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="re-measurements of a step disturbed by others"
    )
    parser.add_argument("--starts", type=int, default=3, help="server starts timed (the median is reported)")
    parser.add_argument("--skip-naive", action="store_true", help="do not measure the naive baseline")
    parser.add_argument("--out", type=Path, help="also write the table to OUT.md and the figures to OUT.json")
    parser.add_argument("--logs", type=Path, help="server logs go here (default: a temporary folder)")
    parser.add_argument("--naive-app", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=8001, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.photos < max(BATCH_SIZES):
        parser.error(f"--photos must be at least {max(BATCH_SIZES)} (the largest batch of the ceiling)")
    args.model, args.checkpoint = args.model.resolve(), args.checkpoint.resolve()
    args.concurrency = sorted(set(args.concurrency))
    args.logs = (args.logs or Path(tempfile.mkdtemp(prefix="serve-benchmark-"))).resolve()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.naive_app:
        serve_naive(args.checkpoint, args.port)
        return
    report = run_benchmark(args)
    table = markdown(report)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"server logs: {args.logs}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The service's memory under small files that decode to 40-megapixel pictures (tests/worst_images.py).

Starts `python -m api` (MEMORY_LIMIT_MB=--limit-mb, 1024 by default: the pod's limit, so the decode budget is
0.4 x 1 GiB) and warms it with a few real photos; the resident memory then is the baseline. Then:

1. one file at a time (each of the 15 formats and modes): the server's peak RSS over the baseline while it
   answers that request alone, beside the estimate it was budgeted by (`--skip-single` to leave it out);
2. the barrage: every worst-case file in turn at concurrency `--concurrency` for `--seconds`, with /health
   probed meanwhile: answers by status and file, the peak RSS, the RSS two seconds after, the peak against
   the limit.

The peak is the kernel's own high-water mark of the server process (VmHWM, reset before each step through
/proc/PID/clear_refs), so no short spike between two samples is missed; a 20 ms sampling of VmRSS is shown
beside it. Run from the repository root:

    .venv/bin/python -m benchmarks.decode_barrage --model models/model.onnx [--seconds 60] [--concurrency 8]
        [--out benchmarks/results/decode_barrage]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from benchmarks import service
from benchmarks.http_load import LoadResult, Request, percentiles, probe, run_load, upload
from catdog import preprocessing
from tests import worst_images

MiB = 2**20
DECODE_MEMORY_FRACTION = 0.4  # api/settings.py's default: the benchmark leaves it unset
WARMUP_PHOTOS = 8
REQUEST_TIMEOUT = 120.0  # a decode may wait its turn for the budget behind several others


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux 4.0+; needs the right to ptrace it)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler:
    """The highest VmRSS of a process seen every `interval` seconds, in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, status_kib(self.pid, "VmRSS") / 1024)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Peak:
    """The server's peak RSS during a block: VmHWM after a reset, else the sampled maximum."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.hwm_mb: float | None = None
        self.sampler = RssSampler(pid)

    def __enter__(self) -> Peak:
        self._reset = reset_peak(self.pid)
        self.sampler.__enter__()
        return self

    def __exit__(self, *_: object) -> None:
        self.sampler.__exit__()
        if self._reset:
            self.hwm_mb = status_kib(self.pid, "VmHWM") / 1024

    @property
    def mb(self) -> float:
        return self.hwm_mb if self.hwm_mb is not None else self.sampler.peak_mb


def worst_requests(budget_bytes: float) -> list[tuple[Request, int]]:
    """A POST /predict per worst-case file, expecting 200, or 413 when its estimate exceeds the budget;
    with the estimate (bytes)."""
    requests = []
    for name in worst_images.MAKERS:
        data = worst_images.worst(name)
        cost = preprocessing.plan_decode(data, size=224).cost_bytes
        over = cost > budget_bytes
        expect = (b'"image_too_large"',) if over else (b'"label":',)
        request = upload(name, data, name, "application/octet-stream", 413 if over else 200, expect)
        requests.append((request, cost))
    return requests


def warm_up(url: str, images: Path) -> None:
    photos = sorted((images / "PetImages" / "Cat").glob("*.jpg"))[:WARMUP_PHOTOS]
    if not photos:
        raise SystemExit(f"no photos under {images}/PetImages/Cat (--images)")
    requests = [upload(path.name, path.read_bytes(), path.name) for path in photos]
    asyncio.run(run_load(url, requests, 2, 3.0))


def send_one(url: str, request: Request) -> tuple[int, bool]:
    """One request on its own: its status, and whether the answer is the expected one."""
    headers = {"Content-Type": request.content_type}
    answer = httpx.post(url + request.path, content=request.body, headers=headers, timeout=REQUEST_TIMEOUT)
    return answer.status_code, request.accepts(answer.status_code, answer.content)


def single_decodes(url: str, pid: int, requests: Sequence[tuple[Request, int]]) -> list[dict[str, Any]]:
    """Each worst-case file alone: its answer and the server's peak over the RSS just before it."""
    rows = []
    for request, cost in requests:
        before = status_kib(pid, "VmRSS") / 1024
        with Peak(pid) as peak:
            status, expected = send_one(url, request)
        rows.append(
            {
                "file": request.kind,
                "bytes": len(worst_images.worst(request.kind)),
                "status": status,
                "unexpected": not expected,
                "peak_over_baseline_mib": round(peak.mb - before, 1),
                "estimate_mib": round(cost / MiB, 1),
                "rss_after_mb": round(status_kib(pid, "VmRSS") / 1024, 1),
            }
        )
    return rows


def send_barrage(url: str, requests: Sequence[Request], concurrency: int, seconds: float) -> LoadResult:
    """`concurrency` clients taking the next file of one shared cycle until `seconds` have passed (each
    client's own cycle, as in run_load, would leave the last files unsent when decodes take seconds)."""
    result = LoadResult(concurrency)
    queue, lock = itertools.cycle(requests), threading.Lock()
    started = time.perf_counter()
    stop_at = started + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as session:
            while time.perf_counter() < stop_at:
                with lock:
                    request = next(queue)
                sent = time.perf_counter()
                headers = {"Content-Type": request.content_type}
                try:
                    answer = session.post(request.path, content=request.body, headers=headers)
                except httpx.HTTPError as exc:
                    with lock:
                        result.errors[type(exc).__name__] += 1
                    continue
                with lock:
                    result.record(
                        request, answer.status_code, answer.content, (time.perf_counter() - sent) * 1e3
                    )

    with ThreadPoolExecutor(concurrency) as pool:
        for done in [pool.submit(client) for _ in range(concurrency)]:
            done.result()
    result.seconds = time.perf_counter() - started
    return result


def barrage(url: str, pid: int, requests: Sequence[Request], args: argparse.Namespace) -> dict[str, Any]:
    before = status_kib(pid, "VmRSS") / 1024
    health: list[float] = []
    prober = threading.Thread(
        target=lambda: health.extend(asyncio.run(probe(url, "/health", args.seconds, 0.2)))
    )
    with Peak(pid) as peak:
        prober.start()
        result = send_barrage(url, requests, args.concurrency, args.seconds)
        prober.join()
    time.sleep(2)
    after = status_kib(pid, "VmRSS") / 1024
    return {
        "seconds": round(result.seconds, 1),
        "concurrency": args.concurrency,
        "answers": result.answered,
        "statuses": {str(status): count for status, count in sorted(result.statuses.items())},
        "files": {kind: dict(sorted(counts.items())) for kind, counts in sorted(result.kinds.items())},
        "unexpected": dict(result.unexpected),
        "client_errors": dict(result.errors),
        "latency_ms": percentiles(result.latencies_ms),
        "health_ms": {**percentiles(health), "max": round(max(health, default=float("nan")), 1)},
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak.mb, 1),
        "peak_sampled_mb": round(peak.sampler.peak_mb, 1),
        "peak_from": "VmHWM" if peak.hwm_mb is not None else "sampled VmRSS",
        "rss_after_mb": round(after, 1),
        "limit_mb": args.limit_mb,
        "peak_over_limit": round(peak.mb / args.limit_mb, 3),  # both MiB (MEMORY_LIMIT_MB counts MiB)
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    budget = args.limit_mb * MiB * DECODE_MEMORY_FRACTION
    requests = worst_requests(budget)  # made before the server starts: a few seconds each
    log = Path(tempfile.mkdtemp(prefix="decode-barrage-")) / "service.log"
    env = {
        "MODEL_URI": str(args.model.resolve()),
        "MODEL_PRECISION": args.precision,
        "MEMORY_LIMIT_MB": str(args.limit_mb),
        "FEEDBACK_DB": str(log.with_name("feedback.db")),
    }
    running = service.start([sys.executable, "-m", "api"], log, env, service.free_port())
    pid = running.process.pid
    try:
        warm_up(running.url, args.images)
        baseline = status_kib(pid, "VmRSS") / 1024
        singles = [] if args.skip_single else single_decodes(running.url, pid, requests)
        figures = barrage(running.url, pid, [request for request, _ in requests], args)
    finally:
        service.stop(running.process)
    return {
        "baseline_rss_mb": round(baseline, 1),
        "decode_budget_mib": round(budget / MiB, 1),
        "single": singles,
        "barrage": figures,
        "other_cores_at_start": round(args.other_load, 2),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Baseline RSS (after {WARMUP_PHOTOS} photos) {report['baseline_rss_mb']} MB; decode budget "
        f"{report['decode_budget_mib']} MiB; other processes used {report['other_cores_at_start']} cores "
        "at the start."
    ]
    if report["single"]:
        lines += [
            "",
            "| file | bytes | answer | peak over the RSS before (MiB) | estimate (MiB) | RSS after (MB) |",
            "| --- | --- | --- | --- | --- | --- |",
            *(
                f"| {row['file']} | {row['bytes']:,} | {row['status']}"
                f"{' (unexpected)' if row['unexpected'] else ''} | {row['peak_over_baseline_mib']:.0f} | "
                f"{row['estimate_mib']:.0f} | {row['rss_after_mb']:.0f} |"
                for row in report["single"]
            ),
        ]
    b = report["barrage"]
    lines += [
        "",
        f"Barrage: {b['answers']} answers in {b['seconds']} s at c={b['concurrency']}, by status "
        f"{b['statuses']}; unexpected {b['unexpected'] or 0}; dropped connections {b['client_errors'] or 0}; "
        f"latency {b['latency_ms']}; /health during it {b['health_ms']} ms.",
        f"RSS before {b['rss_before_mb']:.0f} MB, peak {b['peak_rss_mb']:.0f} MB ({b['peak_from']}; sampled "
        f"every 20 ms: {b['peak_sampled_mb']:.0f}), 2 s after {b['rss_after_mb']:.0f} MB; "
        f"peak / limit ({b['limit_mb']} MiB) = {b['peak_over_limit']:.2f}.",
    ]
    statuses = sorted({str(status) for counts in b["files"].values() for status in counts})
    lines += ["", "| file | " + " | ".join(statuses) + " |", "| --- |" + " --- |" * len(statuses)]
    for name, counts in b["files"].items():
        by_status = {str(status): count for status, count in counts.items()}
        lines.append(f"| {name} | " + " | ".join(str(by_status.get(s, 0)) for s in statuses) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="the ONNX model the service loads")
    parser.add_argument("--precision", default="fp32", help="MODEL_PRECISION")
    parser.add_argument("--images", type=Path, default=service.DEFAULT_IMAGES, help="holds PetImages/")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the barrage")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--limit-mb", type=int, default=1024, help="MEMORY_LIMIT_MB given to the service")
    parser.add_argument("--skip-single", action="store_true", help="no one-file-at-a-time step")
    parser.add_argument("--out", type=Path, help="also write the table to OUT.md and the figures to OUT.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.other_load = service.other_load()
    report = run_benchmark(args)
    text = markdown(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

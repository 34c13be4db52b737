"""Load test: good and bad uploads at concurrency 32 for 60 s; no 5xx, no dropped connection, no leak.

The mix: real JPEGs of the shared sample (multipart and base64) and, between them, every kind of bad upload
(zero bytes, random bytes named .jpg, a truncated JPEG, a PDF, a PNG header declaring 30000x30000 pixels,
invalid base64, a batch with one good and one bad file), each with the status and error code it must get.
It passes when no answer is a 5xx, no connection fails or times out, every answer is the expected one and
the server's resident memory grows by less than 10 % from the end of the warm-up (the first 10 s) to the end.

    python -m benchmarks.load_test --model models/model.onnx            # starts the service itself
    python -m benchmarks.load_test --url http://127.0.0.1:8000 --pid 1234
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import struct
import sys
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import service
from benchmarks.http_load import (
    LoadResult,
    Request,
    b64,
    base64_request,
    batch_upload,
    run_load,
    upload,
)
from catdog.preprocessing import ImageDecodeError, decode

MAX_RSS_GROWTH = 0.10
BOMB_SIDE = 30_000
PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
GOOD_PER_BAD = 4


def _code(code: str) -> tuple[bytes, ...]:
    return (f'"code":"{code}"'.encode(),)


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A tiny PNG whose header declares `side`x`side` pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # the IHDR chunk follows the signature: length (4), type (4), data (13), crc (4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", side, side)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])))
    return bytes(data)


def random_bytes(size: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def bad_requests(photo: bytes) -> list[Request]:
    """One of each bad upload, with the status and error code the service must answer."""
    noise = random_bytes()
    return [
        upload("zero_byte", b"", "empty.jpg", expect_status=400, expect_text=_code("empty_file")),
        upload("random_bytes", noise, "noise.jpg", expect_status=415, expect_text=_code("not_an_image")),
        upload(
            "truncated_jpeg",
            photo[: len(photo) // 2],
            "cut.jpg",
            expect_status=422,
            expect_text=_code("corrupt_image"),
        ),
        upload(
            "pdf",
            PDF,
            "document.pdf",
            "application/pdf",
            expect_status=415,
            expect_text=_code("not_an_image"),
        ),
        upload(
            "bomb_png",
            bomb_png(),
            "bomb.png",
            "image/png",
            expect_status=413,
            expect_text=_code("image_too_large"),
        ),
        base64_request(
            "invalid_base64",
            "%%% this is not base64 %%%",
            expect_status=400,
            expect_text=_code("invalid_base64"),
        ),
        batch_upload(
            "batch_one_bad",
            [("good.jpg", photo), ("noise.jpg", noise)],
            expect_text=(b'"label":', *_code("not_an_image")),
        ),
    ]


def mixed_requests(photos: Sequence[tuple[str, bytes]]) -> list[Request]:
    """Good uploads with a bad one after every GOOD_PER_BAD of them, cycling through the bad kinds."""
    bad = bad_requests(photos[0][1])
    mix: list[Request] = []
    for index, (name, data) in enumerate(photos):
        if index % (2 * GOOD_PER_BAD) == 1:
            mix.append(base64_request("good_base64", b64(data)))
        else:
            mix.append(upload("good", data, name))
        if index % GOOD_PER_BAD == GOOD_PER_BAD - 1:
            mix.append(bad[(index // GOOD_PER_BAD) % len(bad)])
    return mix


def _decodes(data: bytes) -> bool:
    try:
        decode(data, size=32)
    except ImageDecodeError:
        return False
    return True


def load_photos(images: Path, count: int = 96) -> list[tuple[str, bytes]]:
    """Up to `count` real JPEGs of the sample that decode, cats and dogs alternating (the last ones)."""
    folders = [sorted((images / "PetImages" / name).glob("*.jpg"))[-count // 2 :] for name in ("Cat", "Dog")]
    if not all(folders):
        raise SystemExit(f"no photos in {images}/PetImages/{{Cat,Dog}}: pass --images")
    photos = [(path.name, path.read_bytes()) for pair in zip(*folders, strict=False) for path in pair]
    return [(name, data) for name, data in photos if _decodes(data)]


@dataclass
class LoadReport:
    """The load run and the server's memory after the warm-up and at the end."""

    result: LoadResult
    rss_warm_mb: float | None = None
    rss_end_mb: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def rss_growth(self) -> float | None:
        if self.rss_warm_mb is None or self.rss_end_mb is None:
            return None
        return self.rss_end_mb / self.rss_warm_mb - 1

    def failures(self) -> list[str]:
        """Every criterion that failed, in words; empty when the test passed."""
        result, found = self.result, []
        if result.answered == 0:
            found.append("no request was answered")
        if result.server_errors:
            found.append(f"{result.server_errors} answers were 5xx: {self._statuses()}")
        if result.errors:
            found.append(
                f"{sum(result.errors.values())} requests dropped (client side): {dict(result.errors)}"
            )
        if result.unexpected:
            found.append(f"unexpected answers: {dict(result.unexpected)}")
        growth = self.rss_growth
        if growth is not None and growth >= MAX_RSS_GROWTH:
            found.append(
                f"RSS grew {growth:.1%} ({self.rss_warm_mb:.1f} -> {self.rss_end_mb:.1f} MB), "
                f"limit {MAX_RSS_GROWTH:.0%}"
            )
        return found

    def _statuses(self) -> dict[str, int]:
        return {str(status): count for status, count in sorted(self.result.statuses.items())}

    def summary(self) -> dict[str, Any]:
        growth = self.rss_growth
        return {
            **self.result.summary(),
            "rss_after_warmup_mb": None if self.rss_warm_mb is None else round(self.rss_warm_mb, 1),
            "rss_at_end_mb": None if self.rss_end_mb is None else round(self.rss_end_mb, 1),
            "rss_growth_percent": None if growth is None else round(100 * growth, 2),
            "cpu": self.cpu,
            "notes": self.notes,
            "failures": self.failures(),
        }


async def _rss_after(pid: int | None, delay: float) -> float | None:
    await asyncio.sleep(delay)
    return None if pid is None else service.rss_mb(pid)


async def _load(
    url: str, requests: Sequence[Request], pid: int | None, seconds: float, concurrency: int, warmup: float
) -> LoadReport:
    before = service.cpu_sample(pid)
    result, rss_warm = await asyncio.gather(
        run_load(url, requests, concurrency, seconds), _rss_after(pid, min(warmup, seconds))
    )
    cpu = service.cpu_usage(before, service.cpu_sample(pid))
    rss_end = None if pid is None else service.rss_mb(pid)
    return LoadReport(result, rss_warm, rss_end, cpu)


def run(
    url: str,
    images: Path = service.DEFAULT_IMAGES,
    pid: int | None = None,
    seconds: float = 60.0,
    concurrency: int = 32,
    warmup: float = 10.0,
) -> LoadReport:
    """The load test against the server at `url` (its memory is read when its `pid` is given)."""
    report = asyncio.run(_load(url, mixed_requests(load_photos(images)), pid, seconds, concurrency, warmup))
    if pid is None:
        report.notes.append("no --pid: the server's memory was not measured")
    return report


def markdown(report: LoadReport) -> str:
    """Answers by kind and status, throughput, latency, memory and the verdict."""
    figures = report.summary()
    statuses = sorted({status for counts in figures["kinds"].values() for status in counts})
    lines = [
        "| kind | " + " | ".join(str(status) for status in statuses) + " |",
        "| --- |" + " --- |" * len(statuses),
        *(
            f"| {kind} | " + " | ".join(str(counts.get(status, 0)) for status in statuses) + " |"
            for kind, counts in figures["kinds"].items()
        ),
        "",
        f"{figures['requests']} answers in {figures['seconds']} s at c={figures['concurrency']} "
        f"({figures['throughput_rps']} req/s), latency {figures['latency_ms']}; by status "
        f"{figures['statuses']}; dropped connections {figures['client_errors'] or 0}.",
        f"RSS after the warm-up {figures['rss_after_warmup_mb']} MB, "
        f"at the end {figures['rss_at_end_mb']} MB (growth {figures['rss_growth_percent']} %).",
        f"Cores kept busy: {figures['cpu']} (server_cores is 0 without --pid).",
        *figures["notes"],
        "PASS" if not figures["failures"] else "FAIL: " + "; ".join(figures["failures"]),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server")
    target.add_argument("--model", type=Path, help="start the service on this model (`python -m api`)")
    parser.add_argument("--pid", type=int, help="the running server's process id (for its memory)")
    parser.add_argument("--images", type=Path, default=service.DEFAULT_IMAGES, help="holds PetImages/")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the first memory reading")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def _against_own_server(args: argparse.Namespace) -> LoadReport:
    port = service.free_port()
    log = Path(tempfile.mkdtemp(prefix="load-test-")) / "service.log"
    env = {"MODEL_URI": str(args.model.resolve())}
    running = service.start([sys.executable, "-m", "api"], log, env, port)
    try:
        return run(running.url, args.images, running.process.pid, args.seconds, args.concurrency, args.warmup)
    finally:
        service.stop(running.process)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        report = run(args.url, args.images, args.pid, args.seconds, args.concurrency, args.warmup)
    else:
        report = _against_own_server(args)
    print(markdown(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report.summary(), indent=2) + "\n")
    failures = report.failures()
    for failure in failures:
        print(f"load test failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

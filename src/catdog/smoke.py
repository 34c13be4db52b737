"""Smoke test of a deployed prediction service: alive, ready, the right labels on known images, safe on a
bad upload, sane metrics. `make smoke URL=...`, the promotion gate, the container tests and CD all call it.

It needs only the standard library and prometheus-client (both images have them):

    python -m catdog.smoke http://localhost:8000 --image cat.jpg=cat --image dog.jpg=dog
    python -m catdog.smoke http://localhost:8000 --images some/folder      # its cat/ and dog/ subfolders
    python -m catdog.smoke http://localhost:8000 --predictions reports/evaluate/predictions.csv \
        --processed data/processed --per-class 1   # test images the evaluation got right, confidently

Exit status: 0 all checks passed, 1 a check failed (each one is printed), 2 bad arguments (no images).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class SmokeResult:
    """Every check with its outcome; `passed` only when all passed."""

    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check["passed"] for check in self.checks)

    def add(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append({"check": name, "passed": passed, "detail": detail})
        return passed

    def failures(self) -> list[str]:
        return [f"{c['check']}: {c['detail']}" for c in self.checks if not c["passed"]]


def _request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30):
    """(status, body bytes) of one HTTP request; HTTP errors are answers too."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def multipart(field_name: str, filename: str, content: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field, and its content type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def predict(url: str, content: bytes, filename: str = "image.jpg") -> tuple[int, dict[str, Any]]:
    body, content_type = multipart("file", filename, content)
    status, answer = _request(f"{url}/predict", body, {"content-type": content_type})
    return status, json.loads(answer or b"{}")


def wait_ready(url: str, timeout: float) -> tuple[bool, str]:
    """Poll /ready until 200 or `timeout` seconds; (ready, last detail)."""
    deadline, detail = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = _request(f"{url}/ready", timeout=5)
            detail = json.loads(body or b"{}").get("detail", str(status))
            if status == 200:
                return True, detail
        except (urllib.error.URLError, OSError, ValueError) as exc:
            detail = str(exc)
        time.sleep(0.2)
    return False, detail


def health(url: str) -> tuple[bool, str]:
    """(alive, detail) from /health: 200 with status "ok"."""
    try:
        status, body = _request(f"{url}/health", timeout=10)
        answer = json.loads(body or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, str(exc)
    return status == 200 and answer.get("status") == "ok", f"{status} {answer.get('status')}"


def metric_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = _request(f"{url}/metrics")
    if status != 200:
        return {}
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def _predictions_total(samples: dict) -> float:
    return sum(value for (name, _), value in samples.items() if name == "catdog_predictions_total")


def run(
    url: str, cases: list[tuple[Path, str]], timeout: float = 60, expect_version: str | None = None
) -> SmokeResult:
    """Check the service at `url` with labelled images; every check is recorded, none stops the others."""
    url = url.rstrip("/")
    result = SmokeResult()
    ready, detail = wait_ready(url, timeout)
    result.add("health", *health(url))
    if not result.add("ready", ready, detail):
        return result
    before = _predictions_total(metric_samples(url))
    right, wrong, versions = 0, [], set()
    for path, expected in cases:
        status, answer = predict(url, path.read_bytes(), path.name)
        versions.add(answer.get("model", {}).get("version"))
        if status == 200 and answer.get("label") == expected:
            right += 1
        else:
            wrong.append(
                f"{path.name}: expected {expected}, got {answer.get('label') or answer.get('error')}"
            )
    result.add(
        "labels", not wrong and bool(cases), f"{right}/{len(cases)} right" + "; ".join(["", *wrong[:5]])
    )
    status, answer = predict(url, b"this is not an image", "not-an-image.jpg")
    result.add(
        "bad_upload",
        400 <= status < 500 and "error" in answer,
        f"a text file got {status} {answer.get('error', {}).get('code')}",
    )
    samples = metric_samples(url)
    counted = _predictions_total(samples) - before
    ready_gauge = samples.get(("catdog_model_ready", ()), 0)
    info = [dict(labels) for (name, labels) in samples if name == "catdog_model_info"]
    served = info[0].get("version") if info else None
    sane = counted >= right and ready_gauge == 1 and served is not None and served in versions
    if expect_version is not None:
        sane = sane and served == expect_version
    result.add(
        "metrics",
        sane,
        f"{counted:g} predictions counted for {right} right answers, ready={ready_gauge:g}, "
        f"model version {served}" + (f" (expected {expect_version})" if expect_version is not None else ""),
    )
    return result


def folder_cases(folder: Path, per_class: int | None = None) -> list[tuple[Path, str]]:
    """Images in `folder`/<label>/ as (path, label), the first `per_class` of each (all when None)."""
    cases: list[tuple[Path, str]] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = sorted(path for path in sub.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        cases += [(path, sub.name.lower()) for path in images[:per_class]]
    return cases


def confident_cases(
    predictions_csv: Path, processed: Path, per_class: int, min_confidence: float = 0.9
) -> list[tuple[Path, str]]:
    """Test images the evaluation stage labelled right with at least `min_confidence`, `per_class` of each
    label (reports/evaluate/predictions.csv: path, label, predicted, p_<label>; paths under `processed`)."""
    if not predictions_csv.is_file():
        return []
    with predictions_csv.open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])
    cases: list[tuple[Path, str]] = []
    for label in sorted({row["label"] for row in rows}):
        good = [
            row
            for row in rows
            if row["label"] == label == row["predicted"] and float(row[f"p_{label}"]) >= min_confidence
        ]
        cases += [(processed / row["path"], label) for row in good[:per_class]]
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m catdog.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the service's base URL, e.g. http://localhost:8000")
    parser.add_argument("--image", action="append", default=[], help="PATH=LABEL (repeatable)")
    parser.add_argument("--images", type=Path, help="a folder with one subfolder of images per label")
    parser.add_argument(
        "--predictions", type=Path, help="the evaluation's predictions.csv: its confident right answers"
    )
    parser.add_argument(
        "--processed", type=Path, default=Path("data/processed"), help="where --predictions' paths are"
    )
    parser.add_argument("--per-class", type=int, help="images per label from --images/--predictions")
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=0.9,
        help="--predictions: least probability of the right label",
    )
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for /ready")
    parser.add_argument("--expect-version", help="the model version the service must report")
    args = parser.parse_args(argv)
    cases = [(Path(p), label) for p, _, label in (item.rpartition("=") for item in args.image)]
    if args.images:
        if not args.images.is_dir():
            print(f"error: --images {args.images}: not a folder", file=sys.stderr)
            return 2
        cases += folder_cases(args.images, args.per_class)
    if args.predictions:
        if not args.predictions.is_file():
            print(
                f"error: --predictions {args.predictions}: no such file (run evaluate or dvc pull)",
                file=sys.stderr,
            )
            return 2
        cases += confident_cases(args.predictions, args.processed, args.per_class or 1, args.min_confidence)
    missing = [str(path) for path, _ in cases if not path.is_file()]
    if not cases or missing:
        print(f"error: no images given or not found: {', '.join(missing[:5]) or '(none)'}", file=sys.stderr)
        return 2
    result = run(args.url, cases, args.timeout, args.expect_version)
    for check in result.checks:
        print(f"{'ok  ' if check['passed'] else 'FAIL'} {check['check']}: {check['detail']}")
    if not result.passed:
        print(
            f"smoke test FAILED against {args.url}: {'; '.join(result.failures())}",
            file=sys.stderr,
        )
        return 1
    print(f"smoke test passed against {args.url} ({len(cases)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m catdog.replay URL --images DIR`: post-deployment performance tracking against a live service.

Posts each labelled photo of DIR (PetImages/{Cat,Dog}, {Cat,Dog} or {cat,dog}) to the running prediction
service, then its true label to POST /feedback (under the prediction_id the service minted; with the
X-Feedback-Key when given or in $FEEDBACK_API_KEY; waiting out 429 answers), and prints the live accuracy and
drift the service reports. Standard library only, so it runs anywhere Python does.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

LABELS = ("cat", "dog")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
RATE_LIMIT_RETRIES = 5  # 429 answers waited out (Retry-After, at most MAX_WAIT_S each) before giving up
MAX_WAIT_S = 60.0


class ReplayError(Exception):
    """The replay cannot go on; the message says why."""


def labelled_images(folder: Path) -> list[tuple[Path, str]]:
    """(image file, true label) pairs of DIR/PetImages/{Cat,Dog}, DIR/{Cat,Dog} or DIR/{cat,dog}, the
    classes interleaved (so --limit keeps both) and each in name order."""
    base = folder / "PetImages" if (folder / "PetImages").is_dir() else folder
    if not base.is_dir():
        raise ReplayError(f"{folder} is not a folder")
    by_label: dict[str, list[Path]] = {}
    for child in sorted(base.iterdir()):
        if child.is_dir() and child.name.lower() in LABELS:
            files = (path for path in child.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
            by_label.setdefault(child.name.lower(), []).extend(sorted(files))
    groups = [[(path, label) for path in paths] for label, paths in sorted(by_label.items())]
    pairs = [pair for row in itertools.zip_longest(*groups) for pair in row if pair is not None]
    if not pairs:
        raise ReplayError(f"no images in {base}/{{cat,dog}} (or PetImages/{{Cat,Dog}})")
    return pairs


class Service:
    """JSON calls to the prediction service at `url`."""

    def __init__(self, url: str, timeout: float, feedback_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.feedback_key = feedback_key

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON answer), after waiting out up to RATE_LIMIT_RETRIES 429 answers (Retry-After);
        ReplayError when the service cannot be reached."""
        for _ in range(RATE_LIMIT_RETRIES):
            status, answer, retry_after = self._send(method, path, body)
            if status != 429:
                break
            time.sleep(min(retry_after, MAX_WAIT_S))
        return status, answer

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any], float]:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if self.feedback_key and path == "/feedback":
            headers["x-feedback-key"] = self.feedback_key
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers=headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, json.loads(response.read() or b"{}"), 0.0
        except urllib.error.HTTPError as exc:
            try:
                wait = float(exc.headers.get("retry-after") or 1)
            except ValueError:
                wait = 1.0
            try:
                return exc.code, json.loads(exc.read() or b"{}"), wait
            except ValueError:
                return exc.code, {}, wait
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ReplayError(f"cannot reach the prediction service at {self.url}: {reason}") from exc


def _error(answer: dict[str, Any]) -> str:
    error = answer.get("error") or {}
    return f"{error.get('code', 'error')}: {error.get('message', answer)}"


def replay(service: Service, images: list[tuple[Path, str]]) -> dict[str, Any]:
    """Predict and give feedback for each image; returns the local tally and the service's reports."""
    status, ready = service.call("GET", "/ready")
    if status != 200:
        raise ReplayError(f"the service at {service.url} is not ready: {ready.get('detail', status)}")
    refused: Counter[str] = Counter()
    correct = predicted = 0
    for path, label in images:
        image = base64.b64encode(path.read_bytes()).decode("ascii")
        status, answer = service.call("POST", "/predict/base64", {"image": image, "filename": path.name})
        if status != 200:
            refused[answer.get("error", {}).get("code", str(status))] += 1
            continue
        status, given = service.call(
            "POST", "/feedback", {"prediction_id": answer["prediction_id"], "true_label": label}
        )
        if status != 200:
            raise ReplayError(f"feedback for {path} was refused ({status} {_error(given)})")
        predicted += 1
        correct += answer["label"] == label
    status, performance = service.call("GET", "/monitoring/performance")
    if status != 200:
        raise ReplayError(f"GET /monitoring/performance answered {status} ({_error(performance)})")
    _, drift = service.call("GET", "/monitoring/drift")
    return {
        "predicted": predicted,
        "correct": correct,
        "refused": dict(refused),
        "performance": performance,
        "drift": drift,
    }


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary(result: dict[str, Any], sent: int, url: str) -> str:
    """What the replay did and what the service now reports, for the terminal."""
    performance, drift = result["performance"], result["drift"]
    refused = ", ".join(f"{count} {code}" for code, count in result["refused"].items()) or "none"
    recall = ", ".join(f"{label} {c['recall']:.4f}" for label, c in performance["per_class"].items())
    local = result["correct"] / result["predicted"] if result["predicted"] else None
    lines = [
        f"replayed {sent} images to {url}: {result['predicted']} predicted, refused: {refused}",
        f"accuracy of these predictions: {_rate(local)} ({result['correct']}/{result['predicted']})",
        f"service live accuracy: {_rate(performance['accuracy'])} over its last {performance['labelled']} "
        f"labelled predictions (window {performance['window']}; recall: {recall or 'n/a'})",
    ]
    if drift:
        drifted = ", ".join(drift.get("drifted_properties", [])) or "none"
        lines.append(
            f"drift: {drift.get('status')} ({drift.get('images')}/{drift.get('window')} images; "
            f"drifted: {drifted})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m catdog.replay", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the service's base URL, e.g. http://localhost:8000")
    parser.add_argument("--images", type=Path, required=True, help="PetImages/{Cat,Dog} or {cat,dog} folder")
    parser.add_argument(
        "--limit", type=int, default=None, help="at most this many images (classes alternate)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP call")
    parser.add_argument(
        "--feedback-key",
        default=os.environ.get("FEEDBACK_API_KEY"),
        help="the service's FEEDBACK_API_KEY (default: $FEEDBACK_API_KEY), sent as X-Feedback-Key",
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    try:
        images = labelled_images(args.images)[: args.limit]
        service = Service(args.url, args.timeout, args.feedback_key)
        result = replay(service, images)
    except ReplayError as exc:
        sys.exit(f"replay failed: {exc}")
    print(summary(result, len(images), service.url))


if __name__ == "__main__":
    main()

"""The feedback store's size on disk: rows and bytes (database + WAL + shared memory) after N predictions.

Drives `api.feedback.FeedbackStore` directly (not over HTTP) with the service's own settings, a share of the
predictions labelled through the store's feedback call, and prints a line at each checkpoint. Bounded in time:
it stops at --seconds and says how far it got.

    python -m benchmarks.feedback_store                                   # 1 M predictions, the defaults
    python -m benchmarks.feedback_store --predictions 3000000 --max-rows 10000000 --max-mb 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from api.feedback import FeedbackStore
from api.metrics import ServiceMetrics
from api.settings import Settings

BATCH = 5_000  # predictions between two waits for the writer (the store drops past MAX_PENDING = 10 000)
MIB = 1024 * 1024


def prediction(index: int) -> Any:
    """A served prediction as the store sees it (label, confidence, probabilities, model name and version)."""
    cat = (index * 7919 % 1000) / 1000
    label = "cat" if cat >= 0.5 else "dog"
    return SimpleNamespace(
        label=label,
        confidence=max(cat, 1 - cat),
        probabilities={"cat": cat, "dog": 1 - cat},
        model=SimpleNamespace(name="tf_efficientnet_lite0", version="3"),
    )


def line(done: int, store: FeedbackStore, seconds: float) -> dict[str, Any]:
    size = store.size()
    print(
        f"{done:>9,} predictions  {size['rows']:>9,} rows  {size['bytes']:>12,} bytes "
        f"({size['bytes'] / MIB:6.1f} MiB: database {size['database_bytes'] / MIB:6.1f}, WAL "
        f"{size['wal_bytes'] / MIB:4.1f}; {size['bytes'] / max(size['rows'], 1):4.0f} B/row)  "
        f"{seconds:6.1f} s",
        flush=True,
    )
    return {"predictions": done, **size, "seconds": round(seconds, 1)}


async def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    settings = Settings(
        feedback_db=str(folder / "feedback.db"),
        feedback_max_rows=args.max_rows,
        feedback_max_mb=args.max_mb,
    )
    store = FeedbackStore(settings, ServiceMetrics())
    await store.start()
    every = round(1 / args.labelled) if args.labelled else 0
    checkpoints = sorted({*(int(args.predictions * f) for f in (0.1, 0.25, 0.5, 0.75)), args.predictions})
    lines, started, done, labelled = [], time.monotonic(), 0, 0
    print(
        f"feedback store: {args.predictions:,} predictions, 1 in {every or 'none'} labelled, "
        f"FEEDBACK_MAX_ROWS={args.max_rows:,}, FEEDBACK_MAX_MB={args.max_mb:g}, at most {args.seconds:g} s"
    )
    while done < args.predictions and time.monotonic() - started < args.seconds:
        ids = []
        for index in range(done, min(done + BATCH, args.predictions)):
            ids.append((index, store.remember(secrets.token_hex(16), prediction(index))))
        await store.drain()
        for index, prediction_id in ids:
            if every and index % every == 0:
                await store.record(prediction_id, "cat" if index % 3 else "dog", "192.0.2.7")
                labelled += 1
        done += len(ids)
        if done >= checkpoints[0]:
            lines.append(line(done, store, time.monotonic() - started))
            checkpoints = checkpoints[1:] or [args.predictions + 1]
    if done < args.predictions:
        print(f"stopped at the {args.seconds:g} s limit after {done:,} predictions")
        lines.append(line(done, store, time.monotonic() - started))
    await store.stop()
    return {"labelled": labelled, "checkpoints": lines, "complete": done >= args.predictions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=1_000_000)
    parser.add_argument(
        "--labelled", type=float, default=0.01, help="share of predictions that get feedback (0-1)"
    )
    parser.add_argument("--max-rows", type=int, default=Settings.model_fields["feedback_max_rows"].default)
    parser.add_argument("--max-mb", type=float, default=Settings.model_fields["feedback_max_mb"].default)
    parser.add_argument("--seconds", type=float, default=600, help="stop after this long")
    parser.add_argument("--dir", type=Path, default=None, help="a folder for the temporary database")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        result = asyncio.run(run(args, Path(folder)))
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}))
    sys.exit(0 if result["complete"] else 1)


if __name__ == "__main__":
    main()

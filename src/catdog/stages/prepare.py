"""DVC stage `prepare`: usable raw images to square RGB JPEGs in a stratified, leak-free split.

Each image goes through the shared preprocessing module (EXIF orientation, any mode to RGB, resize).
The split is deterministic: near-duplicate groups (found by `validate`) are ordered by a seeded hash
of their content and assigned whole, per class, so no group straddles train/val/test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from catdog import preprocessing
from catdog.config import CLASSES, SPLITS, PrepareParams, Project, SplitParams
from catdog.errors import DataSourceError
from catdog.stages.validate import read_image_table

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ("path", "label", "split", "group", "source", "sha256")
REQUIRED_FIELDS = MANIFEST_FIELDS[:4]


def assign_splits(rows: list[dict[str, str]], fractions: SplitParams, seed: int) -> dict[str, str]:
    """Map each row's path to a split, stratified by label, keeping each group in one split."""
    targets = (("train", fractions.train), ("val", fractions.train + fractions.val), ("test", 1.0))
    assignment: dict[str, str] = {}
    for label in CLASSES:
        groups: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            if row["label"] == label:
                groups[row["group"] or row["sha256"]].append(row["path"])
        order = sorted(groups, key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest())
        total = sum(len(members) for members in groups.values())
        placed = 0
        for key in order:
            share = placed / total
            split = next(name for name, upper in targets if share < upper)
            for path in groups[key]:
                assignment[path] = split
            placed += len(groups[key])
    return assignment


def output_names(rows: list[dict[str, str]]) -> dict[str, str]:
    """A unique `<stem>.jpg` per class folder (the content hash is added when stems collide)."""
    seen: Counter[tuple[str, str]] = Counter((row["label"], Path(row["path"]).stem) for row in rows)
    names = {}
    for row in rows:
        stem = Path(row["path"]).stem
        unique = stem if seen[(row["label"], stem)] == 1 else f"{stem}-{row['sha256'][:8]}"
        names[row["path"]] = f"{unique}.jpg"
    return names


def _convert(task: tuple[str, str, int, str, int]) -> str:
    source, target, size, resize, quality = task
    img = preprocessing.decode(source, size=size, resize=resize)  # type: ignore[arg-type]
    img.save(target, format="JPEG", quality=quality, optimize=False)
    return target


def convert_all(tasks: list[tuple[str, str, int, str, int]], workers: int) -> None:
    """Run the conversions, on `workers` processes when there is enough work."""
    if workers > 1 and len(tasks) > 64:
        with get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_convert, tasks, chunksize=16):
                pass
    else:
        for task in tasks:
            _convert(task)


def write_manifest(entries: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(sorted(entries, key=lambda e: e["path"]))


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The split manifest (path relative to data/processed, label, split, group, ...), checked."""
    if not path.is_file():
        raise DataSourceError(f"{path} not found; run the prepare stage first")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(REQUIRED_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise DataSourceError(f"{path} lacks the columns {', '.join(sorted(missing))}")
        rows = list(reader)
    for row in rows:
        if row["label"] not in CLASSES:
            raise DataSourceError(f"{path}: unknown label {row['label']!r} for {row['path']}")
        if row["split"] not in SPLITS:
            raise DataSourceError(f"{path}: unknown split {row['split']!r} for {row['path']}")
    return rows


def load_split(processed: Path, split: str, class_names: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """Image paths and integer labels of one split of the manifest."""
    rows = [row for row in read_manifest(processed / "manifest.csv") if row["split"] == split]
    return [processed / row["path"] for row in rows], np.array([class_names.index(r["label"]) for r in rows])


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a finished folder into place so `target` is never half-written."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def prepare(raw_base: Path, rows: list[dict[str, str]], out: Path, params: PrepareParams, seed: int) -> dict:
    """Convert the usable rows into `out`; returns the stage's metrics."""
    usable = [row for row in rows if row["usable"] == "1"]
    splits = assign_splits(usable, params.split, seed)
    names = output_names(usable)
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for split in SPLITS:
        for label in CLASSES:
            (staging / split / label).mkdir(parents=True, exist_ok=True)
    entries, tasks = [], []
    for row in usable:
        rel = f"{splits[row['path']]}/{row['label']}/{names[row['path']]}"
        entries.append(
            {
                "path": rel,
                "label": row["label"],
                "split": splits[row["path"]],
                "group": row["group"],
                "source": row["path"],
                "sha256": row["sha256"],
            }
        )
        tasks.append(
            (
                str(raw_base / row["path"]),
                str(staging / rel),
                params.image_size,
                params.resize,
                params.jpeg_quality,
            )
        )
    started = time.perf_counter()
    try:
        convert_all(tasks, params.workers)
        write_manifest(entries, staging / "manifest.csv")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    _replace_dir(staging, out)
    counts = Counter((e["split"], e["label"]) for e in entries)
    return {
        "images": len(entries),
        "skipped_unusable": len(rows) - len(usable),
        "splits": {s: {c: counts.get((s, c), 0) for c in CLASSES} for s in SPLITS},
        "image_size": params.image_size,
        "resize": params.resize,
        "seconds": round(seconds, 2),
        "images_per_second": round(len(entries) / seconds, 1) if seconds > 0 else None,
    }


def run(root: Path | None = None) -> dict:
    """Prepare data/processed from data/raw and the validation table; print the throughput."""
    project = Project(root)
    paths, params = project.paths, project.params
    rows = read_image_table(paths.validation_images)
    metrics = prepare(paths.raw, rows, paths.processed, params.prepare, params.seed)
    paths.metrics.mkdir(parents=True, exist_ok=True)
    paths.prepare_metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    split_text = ", ".join(f"{s} {sum(v.values())}" for s, v in metrics["splits"].items())
    print(
        f"prepare: {metrics['images']} images ({split_text}) at {params.prepare.image_size}px "
        f"in {metrics['seconds']}s = {metrics['images_per_second']} images/s "
        f"on {params.prepare.workers} workers"
    )
    return metrics

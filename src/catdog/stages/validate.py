"""DVC stage `validate`: decode every raw image, classify its problems, quarantine the unusable ones.

Nothing is deleted from data/raw: unusable files are listed in the report and left out by `prepare`.
Convertible oddities (CMYK, grayscale, palette, 16-bit, alpha, wrong extension) are kept and
normalised by the shared preprocessing module. Thresholds from params.yaml fail the stage.
No file's content can fail the stage: files are decoded in worker processes, any exception a decoder
raises is classified (`corrupt`), a file that cannot be read (no permission, a dangling link, removed
during the run) is `unreadable`, and a file whose decoder kills its worker (a crash in native code, or
out of memory) is re-run alone and, if that fails too, quarantined as `decoder_crashed`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catdog import preprocessing
from catdog.config import CLASSES, RAW_CLASS_DIRS, Project, ValidateParams
from catdog.errors import DataSourceError, raise_failed_gates

log = logging.getLogger(__name__)

# A file with any of these problems cannot be used for training.
UNUSABLE = (
    "unreadable",  # reading the file failed (OSError): no permission, a dangling link, removed during the run
    "zero_byte",
    "not_an_image",
    "unsupported_format",
    "truncated",
    "corrupt",  # the decoder raised an exception that preprocessing does not classify
    "decoder_crashed",  # the decoder killed its worker process (or ran out of memory), also when run alone
    "decompression_bomb",
    "too_small",
    "label_conflict",
)
# Redundant copies: left out so the same bytes never appear twice (or in two splits).
EXCLUDED = ("exact_duplicate",)
# Usable as they are once converted by the preprocessing module.
CONVERTIBLE = ("wrong_extension", "cmyk", "grayscale", "palette", "16bit", "alpha", "animated")
# Kept, but grouped so that near copies never straddle the train/val/test split.
INFORMATIONAL = ("near_duplicate",)
PROBLEMS = UNUSABLE + EXCLUDED + CONVERTIBLE + INFORMATIONAL

_DECODE_CODES = {
    "empty": "zero_byte",
    "not_an_image": "not_an_image",
    "unsupported_format": "unsupported_format",
    "truncated": "truncated",
    "too_large": "decompression_bomb",
    "too_small": "too_small",
}
# Files per task sent to a worker: few round trips, and little to re-run when a worker dies.
CHUNK = 32
Task = tuple[str, str, str, ValidateParams]  # path, label, path relative to the raw folder's parent, params


@dataclass
class ImageRecord:
    """What validation learned about one raw file."""

    path: str
    label: str
    bytes: int
    sha256: str
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    dhash: int | None = None
    group: str = ""
    problems: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def usable(self) -> bool:
        return not any(p in UNUSABLE or p in EXCLUDED for p in self.problems)


def inspect_file(path: Path, label: str, rel: str, params: ValidateParams) -> ImageRecord:
    """Decode one file fully and record every problem found; never raises for bad content."""
    try:
        if path.exists() and not path.is_file():
            # A link to a folder or a pipe (reading a pipe would block): not a file's content to decode.
            raise IsADirectoryError("not a regular file (a link to a folder, a pipe or a device)")
        data = path.read_bytes()
    except OSError as exc:
        return _unreadable(path, label, rel, exc)
    record = ImageRecord(path=rel, label=label, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    try:
        info = preprocessing.inspect(data, max_pixels=params.max_pixels)
        record.format, record.mode = info.format, info.mode
        record.width, record.height = info.width, info.height
        record.problems.extend(info.issues)
        if not preprocessing.extension_matches(path, info.format):
            record.problems.append("wrong_extension")
        img = preprocessing.decode(data, max_pixels=params.max_pixels, min_side=params.min_side)
        record.dhash = preprocessing.dhash(img)
    except preprocessing.ImageDecodeError as exc:
        record.problems.append(_DECODE_CODES.get(exc.code, "not_an_image"))
        record.detail = exc.message
    except MemoryError:
        raise  # may say more about the machine than the file: the caller re-runs the file alone
    except Exception as exc:
        # A decoder failure that preprocessing does not classify (Pillow's plugins raise whatever their
        # parsers hit): the file is unusable all the same, and one bad file must not stop the stage.
        record.problems.append("corrupt")
        record.detail = f"corrupt: {_describe(exc)}"
    return record


def _unreadable(path: Path, label: str, rel: str, exc: OSError) -> ImageRecord:
    """The record of a file that could not be read: listed with its reason, nothing to decode."""
    # strerror leaves out the absolute path that str(exc) carries: the report names the file already.
    reason = f"{type(exc).__name__}: {exc.strerror}" if exc.strerror else _describe(exc)
    log.warning("%s: cannot be read (%s); quarantined as unreadable", rel, reason)
    return ImageRecord(
        path=rel, label=label, bytes=0, sha256="", problems=["unreadable"], detail=f"unreadable: {reason}"
    )


def _describe(exc: BaseException) -> str:
    """`module.Type: first line of the message`, the module left out for built-in exceptions."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = str(exc).strip().splitlines()
    return f"{name}: {text[0][:200]}" if text else name


def _inspect_chunk(tasks: list[Task]) -> list[ImageRecord | None]:
    """Inspect files in a worker process; None for a file whose decoding ran out of memory."""
    records: list[ImageRecord | None] = []
    for path, label, rel, params in tasks:
        try:
            records.append(inspect_file(Path(path), label, rel, params))
        except MemoryError:
            records.append(None)
    return records


def _inspect_in_pool(tasks: list[Task], workers: int) -> list[ImageRecord | None]:
    """Inspect every file in `workers` processes; None marks a file to re-run alone: out of memory, in a
    chunk that raised, or in a chunk that was in flight when a worker process died (a new pool then takes
    the remaining chunks)."""
    results: list[ImageRecord | None] = [None] * len(tasks)
    pending = deque(range(start, min(start + CHUNK, len(tasks))) for start in range(0, len(tasks), CHUNK))
    while pending:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # Two chunks per worker in flight: the workers never wait, and a crash loses little work.
            running: dict[Future, range] = {}
            broken = False
            while (pending or running) and not broken:
                while pending and len(running) < 2 * workers:
                    chunk = pending.popleft()
                    running[pool.submit(_inspect_chunk, [tasks[i] for i in chunk])] = chunk
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = any(isinstance(f.exception(), BrokenProcessPool) for f in done)
                if broken:
                    wait(running)  # a broken pool fails every unfinished task: let them all settle
                    done = set(running)
                for future in done:
                    chunk = running.pop(future)
                    error = future.exception()
                    if error is None:
                        results[chunk.start : chunk.stop] = future.result()
                    elif not isinstance(error, BrokenProcessPool):
                        # Unexpected, since inspect_file classifies what files do: its files stay None and
                        # are re-run one at a time, so one file cannot cost the others their records.
                        log.warning("a validate chunk failed (%s): its files are re-run one at a time", error)
        if broken:
            log.warning(
                "a validate worker process died (a crash in a native decoder, or killed for memory): "
                "its files are re-run one at a time"
            )
    return results


def _inspect_alone(tasks: list[Task], indices: list[int], results: list[ImageRecord | None]) -> None:
    """Re-run files one at a time in a single worker process: a file that kills it again is the culprit."""
    pool: ProcessPoolExecutor | None = None
    try:
        for i in indices:
            pool = pool or ProcessPoolExecutor(max_workers=1)
            try:
                [record] = pool.submit(_inspect_chunk, [tasks[i]]).result()
            except BrokenProcessPool:
                pool.shutdown()
                pool = None
                results[i] = _crashed(tasks[i], "its decoder crashed the worker process, also when run alone")
                continue
            except Exception as exc:
                results[i] = _crashed(tasks[i], f"inspecting it raised {_describe(exc)}, also when run alone")
                continue
            if record is None:
                record = _crashed(tasks[i], "its decoder ran out of memory, also when run alone")
            results[i] = record
    finally:
        if pool is not None:
            pool.shutdown()


def _crashed(task: Task, why: str) -> ImageRecord:
    """The record of a file that no worker process could decode: quarantined, never deleted."""
    path, label, rel, _ = task
    try:
        data = Path(path).read_bytes()
    except OSError:
        data = None  # removed (or made unreadable) since: still listed, with what is known
    log.warning("%s: %s; quarantined as decoder_crashed", rel, why)
    return ImageRecord(
        path=rel,
        label=label,
        bytes=len(data) if data is not None else 0,
        sha256=hashlib.sha256(data).hexdigest() if data is not None else "",
        problems=["decoder_crashed"],
        detail=f"decoder_crashed: {why}",
    )


def list_raw_files(raw_images: Path) -> list[tuple[Path, str]]:
    """Every file (not only images) under the class folders, sorted, with its label."""
    if not raw_images.is_dir():
        raise DataSourceError(f"{raw_images}: raw data not found; run the ingest stage first")
    files: list[tuple[Path, str]] = []
    for label in CLASSES:
        folder = raw_images / RAW_CLASS_DIRS[label]
        if not folder.is_dir():
            raise DataSourceError(f"{folder}: class folder missing from the raw data")
        # Links count too, dangling ones included: a file that cannot be read is reported, not skipped.
        files.extend((p, label) for p in sorted(folder.iterdir()) if p.is_file() or p.is_symlink())
    return files


def hamming_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 512) -> Iterable[tuple[int, int]]:
    """Index pairs (i < j) whose 64-bit hashes differ in at most `max_distance` bits."""
    as_bytes = hashes.astype(">u8").view(np.uint8).reshape(len(hashes), 8)
    popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint8)
    for start in range(0, len(hashes), chunk):
        block = as_bytes[start : start + chunk]
        distance = popcount[block[:, None, :] ^ as_bytes[None, :, :]].sum(axis=2, dtype=np.uint16)
        rows, cols = np.nonzero(distance <= max_distance)
        for i, j in zip(rows + start, cols, strict=True):
            if i < j:
                yield int(i), int(j)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def mark_duplicates(records: list[ImageRecord], max_distance: int) -> None:
    """Flag exact duplicates, group near duplicates, and quarantine pictures filed under both labels."""
    by_sha: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        if record.dhash is not None:
            by_sha[record.sha256].append(record)
    for copies in by_sha.values():
        if len({r.label for r in copies}) > 1:
            for r in copies:
                r.problems.append("label_conflict")
        else:
            for r in copies[1:]:
                r.problems.append("exact_duplicate")

    candidates = [r for r in records if r.usable]
    hashes = np.array([r.dhash for r in candidates], dtype=np.uint64)
    groups = _UnionFind(len(candidates))
    for i, j in hamming_pairs(hashes, max_distance):
        groups.union(i, j)
    members: dict[int, list[ImageRecord]] = defaultdict(list)
    for index, record in enumerate(candidates):
        members[groups.find(index)].append(record)
    for group in members.values():
        group_id = min(r.sha256 for r in group)[:16]
        for r in group:
            r.group = group_id
        if len(group) == 1:
            continue
        conflict = len({r.label for r in group}) > 1
        for r in group:
            r.problems.append("label_conflict" if conflict else "near_duplicate")


def summarise(records: list[ImageRecord], params: ValidateParams) -> dict:
    """The JSON report: counts per problem and class, file lists, gate results."""
    usable = Counter(r.label for r in records if r.usable)
    totals = Counter(r.label for r in records)
    per_problem = {p: Counter(r.label for r in records if p in r.problems) for p in PROBLEMS}
    unusable = [r for r in records if any(p in UNUSABLE for p in r.problems)]
    unusable_fraction = len(unusable) / max(len(records), 1)
    counts = [usable.get(c, 0) for c in CLASSES]
    imbalance = max(counts) / min(counts) if min(counts) else float("inf")
    gates = {
        "max_unusable_fraction": {
            "value": round(unusable_fraction, 6),
            "threshold": params.max_unusable_fraction,
            "passed": unusable_fraction <= params.max_unusable_fraction,
        },
        "max_class_imbalance": {
            "value": round(imbalance, 4) if imbalance != float("inf") else None,
            "threshold": params.max_class_imbalance,
            "passed": imbalance <= params.max_class_imbalance,
        },
    }
    near_groups = defaultdict(list)
    for r in records:
        if "near_duplicate" in r.problems or ("label_conflict" in r.problems and r.group):
            near_groups[r.group].append(r.path)
    return {
        "total": len(records),
        "usable": sum(usable.values()),
        "unusable": len(unusable),
        "excluded_duplicates": sum(1 for r in records if "exact_duplicate" in r.problems),
        "per_class": {c: {"total": totals.get(c, 0), "usable": usable.get(c, 0)} for c in CLASSES},
        "problems": {p: {c: per_problem[p].get(c, 0) for c in CLASSES} for p in PROBLEMS},
        "files": {p: sorted(r.path for r in records if p in r.problems) for p in PROBLEMS},
        "quarantine": [
            {"path": r.path, "label": r.label, "problems": r.problems, "detail": r.detail}
            for r in records
            if not r.usable
        ],
        "near_duplicate_groups": sorted(sorted(g) for g in near_groups.values()),
        "gates": gates,
        "passed": all(g["passed"] for g in gates.values()),
        "params": params.model_dump(),
    }


def render_summary(report: dict) -> str:
    """A human-readable Markdown summary of the report."""
    lines = [
        "# Data validation",
        "",
        f"{report['total']} files, {report['usable']} usable, {report['unusable']} unusable, "
        f"{report['excluded_duplicates']} exact duplicates left out.",
        "",
        "| class | files | usable |",
        "|---|---|---|",
        *(f"| {c} | {v['total']} | {v['usable']} |" for c, v in report["per_class"].items()),
        "",
        "| problem | " + " | ".join(CLASSES) + " | kind |",
        "|---|" + "---|" * len(CLASSES) + "---|",
    ]
    for problem, counts in report["problems"].items():
        if any(counts.values()):
            kind = next(
                name
                for name, members in (
                    ("unusable", UNUSABLE),
                    ("left out", EXCLUDED),
                    ("converted", CONVERTIBLE),
                    ("grouped", INFORMATIONAL),
                )
                if problem in members
            )
            lines.append(f"| {problem} | " + " | ".join(str(counts[c]) for c in CLASSES) + f" | {kind} |")
    lines += ["", "| gate | value | threshold | result |", "|---|---|---|---|"]
    for name, gate in report["gates"].items():
        lines.append(
            f"| {name} | {gate['value']} | {gate['threshold']} | {'pass' if gate['passed'] else 'FAIL'} |"
        )
    if report["quarantine"]:
        lines += ["", "## Quarantined files", ""]
        lines += [
            f"- `{q['path']}`: {', '.join(q['problems'])}" + (f" ({q['detail']})" if q["detail"] else "")
            for q in report["quarantine"][:200]
        ]
        if len(report["quarantine"]) > 200:
            lines.append(f"- ... and {len(report['quarantine']) - 200} more (see validation.json)")
    return "\n".join(lines) + "\n"


def write_image_table(records: list[ImageRecord], path: Path) -> None:
    """Per-file results for `prepare`: one row per raw file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["path", "label", "usable", "group", "sha256", "format", "mode", "width", "height", "problems"]
        )
        for r in records:
            writer.writerow(
                [
                    r.path,
                    r.label,
                    int(r.usable),
                    r.group,
                    r.sha256,
                    r.format,
                    r.mode,
                    r.width,
                    r.height,
                    ";".join(r.problems),
                ]
            )


def read_image_table(path: Path) -> list[dict[str, str]]:
    """The per-file table written by `validate`."""
    if not path.is_file():
        raise DataSourceError(f"{path}: validation results not found; run the validate stage first")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def validate_folder(raw_images: Path, params: ValidateParams, workers: int = 2) -> list[ImageRecord]:
    """Inspect every file under raw_images/{Cat,Dog} and mark duplicates; paths are relative to its parent."""
    files = list_raw_files(raw_images)
    base = raw_images.parent
    tasks: list[Task] = [(str(p), label, p.relative_to(base).as_posix(), params) for p, label in files]
    # Always in worker processes, even for one worker: a crashing decoder takes down a worker, not the stage.
    results = _inspect_in_pool(tasks, max(1, workers)) if tasks else []
    _inspect_alone(tasks, [i for i, r in enumerate(results) if r is None], results)
    records = [r for r in results if r is not None]
    mark_duplicates(records, params.near_duplicate_distance)
    return records


def run(root: Path | None = None) -> dict:
    """Validate data/raw, write the reports, and fail when a threshold is crossed."""
    project = Project(root)
    paths, params = project.paths, project.params
    started = time.perf_counter()
    records = validate_folder(paths.raw_images, params.validate_, workers=params.prepare.workers)
    report = summarise(records, params.validate_)
    report["seconds"] = round(time.perf_counter() - started, 2)
    paths.reports.mkdir(parents=True, exist_ok=True)
    paths.validation_report.write_text(json.dumps(report, indent=2) + "\n")
    paths.validation_summary.write_text(render_summary(report))
    write_image_table(records, paths.validation_images)
    metrics = {k: report[k] for k in ("total", "usable", "unusable", "excluded_duplicates")}
    metrics["problems"] = {p: sum(v.values()) for p, v in report["problems"].items()}
    metrics["gates"] = {k: g["value"] for k, g in report["gates"].items()}
    paths.metrics.mkdir(parents=True, exist_ok=True)
    paths.validation_metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info(
        "validated %d files in %.1fs: %d usable, %d unusable, %d duplicates left out (%s)",
        report["total"],
        report["seconds"],
        report["usable"],
        report["unusable"],
        report["excluded_duplicates"],
        paths.validation_summary,
    )
    raise_failed_gates(report["gates"], "data validation", paths.validation_summary)
    return report

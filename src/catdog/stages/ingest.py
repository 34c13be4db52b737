"""DVC stage `ingest`: acquire the raw dataset described by data/source.json into data/raw/PetImages.

A URL is downloaded (resumable, retried, SHA-256 verified or recorded on first use) and extracted like a
local zip; a folder is hard-linked or copied. Every file of Cat/ and Dog/ is taken as it is (images are
not decoded: `validate` judges them), except subfolders and hidden dotfiles. `data.max_per_class` keeps
a seeded sample per class. data/raw is built in a temporary sibling folder and swapped in by rename, so
a failure leaves the previous data/raw untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from catdog.config import DownloadParams, Project
from catdog.errors import DataSourceError, TransientError
from catdog.stages.source import CLASS_DIRS, IMAGES_FOLDER, class_files, read_checksums, write_if_changed

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
DOWNLOAD_CHUNK_BYTES = 1 << 16
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class _RetryableError(Exception):
    """A download attempt failed in a way worth retrying (the .part file is kept)."""


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download_name(url: str) -> str:
    """The file name a URL is saved under in data/downloads."""
    name = PurePosixPath(unquote(urlparse(url).path)).name
    return name if name and not name.startswith(".") else "download.zip"


def download(url: str, dest: Path, retry: DownloadParams) -> Path:
    """Download `url` to `dest` through `dest`.part, resuming it with a Range request after a failure.

    A complete `dest` is reused unless `dest`.url records that it came from another URL. Connection
    errors, timeouts and 5xx answers are retried with exponential backoff (`retry`, params.yaml
    data.download); an attempt that made progress does not count. When they outlast the attempts the
    error is a TransientError (the orchestrator may retry the whole stage later).
    """
    part = dest.with_name(dest.name + ".part")
    origin = dest.with_name(dest.name + ".url")
    if origin.is_file() and origin.read_text().strip() != url:
        dest.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    if dest.is_file():
        log.info("using the earlier download %s", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    origin.write_text(url + "\n")
    failures = 0
    with requests.Session() as session:
        while True:
            before = _size(part)
            try:
                _attempt(session, url, part)
                break
            except _RetryableError as exc:
                failures = 0 if _size(part) > before else failures + 1
                if failures >= retry.attempts:
                    raise TransientError(f"cannot download {url}: {exc}") from None
                delay = retry.backoff_seconds * 2 ** max(failures - 1, 0)
                log.warning("download of %s interrupted (%s); retrying in %.1f s", url, exc, delay)
                time.sleep(delay)
    part.replace(dest)
    return dest


def _attempt(session: requests.Session, url: str, part: Path) -> None:
    """One GET of `url` appended to `part`; raises _RetryableError or DataSourceError."""
    offset = _size(part)
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with session.get(
            url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
        ) as response:
            if response.status_code == 416 and offset:
                log.warning("the server refused to resume %s; downloading it again", url)
                part.unlink()
                raise _RetryableError("range not satisfiable")
            if response.status_code in RETRY_STATUS:
                raise _RetryableError(f"HTTP {response.status_code} {response.reason}")
            if response.status_code >= 400:
                raise DataSourceError(f"cannot download {url}: HTTP {response.status_code} {response.reason}")
            if offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                log.info("the server ignored the Range request; downloading %s from the start", url)
                offset = 0
            length = response.headers.get("Content-Length")
            expected = offset + int(length) if length and length.isdigit() else None
            with (
                part.open("ab" if offset else "wb") as out,
                tqdm(
                    total=expected,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name.removesuffix(".part"),
                    disable=not sys.stderr.isatty(),
                ) as bar,
            ):
                for chunk in response.iter_content(DOWNLOAD_CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        raise _RetryableError(_reason(exc)) from exc
    except requests.RequestException as exc:
        raise DataSourceError(f"cannot download {url}: {_reason(exc)}") from exc
    if expected is not None and _size(part) != expected:
        raise _RetryableError(f"got {_size(part)} of {expected} bytes")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _reason(exc: BaseException) -> str:
    """A requests error in one line: the operating system's reason, else the innermost message."""
    causes: list[BaseException] = []
    todo = [exc]
    while todo:
        cause = todo.pop(0)
        if any(cause is seen for seen in causes):
            continue
        causes.append(cause)
        links = (cause.__cause__, cause.__context__, getattr(cause, "reason", None), *cause.args)
        todo.extend(link for link in links if isinstance(link, BaseException))
    inner = [c for c in causes if not isinstance(c, requests.RequestException)]
    messages = [c.strerror for c in inner if isinstance(c, OSError) and c.strerror]
    messages += [c.args[0] for c in inner if c.args and isinstance(c.args[0], str)]
    return " ".join((messages[0] if messages else str(exc) or type(exc).__name__).split())


def verify(path: Path, expected: str, what: str, *, delete: bool) -> None:
    """Check the file's SHA-256; a mismatch (after deleting the file if `delete`) raises DataSourceError."""
    expected = expected.strip().lower()
    actual = sha256_of(path)
    if actual == expected:
        return
    note = ""
    if delete:
        path.unlink(missing_ok=True)
        note = f" (the bad file {path} was deleted)"
    raise DataSourceError(f"{what}: SHA-256 mismatch, expected {expected} but got {actual}{note}")


def sample(names: list[str], max_per_class: int | None, seed: int, label: str) -> list[str]:
    """The sorted names, or a seeded sample of `max_per_class` of them (the same one every time)."""
    names = sorted(names)
    if max_per_class is None or len(names) <= max_per_class:
        return names
    return sorted(random.Random(f"{seed}:{label}").sample(names, max_per_class))


def _member_classes(archive: zipfile.ZipFile) -> dict[str, dict[str, zipfile.ZipInfo]]:
    """Per class folder, the archive's files directly under PetImages/<class>/ by name.

    `PetImages/` at the top is preferred, then one nested in a folder, then class folders at the top.
    """
    found: dict[str, dict[str, dict[str, zipfile.ZipInfo]]] = {}
    for info in archive.infolist():
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or (parts and parts[0].endswith(":")) or ".." in parts:
            raise DataSourceError(
                f"{archive.filename}: unsafe member path {info.filename!r} (absolute or with '..'); refused"
            )
        if info.is_dir() or len(parts) < 2 or parts[-1].startswith("."):
            continue
        folders, label = parts[:-2], parts[-2]
        images_folder = not folders or (folders[-1] == IMAGES_FOLDER and folders[0] != "__MACOSX")
        if label in CLASS_DIRS and images_folder:
            found.setdefault("/".join(folders), {}).setdefault(label, {})[parts[-1]] = info
    if not found:
        return {label: {} for label in CLASS_DIRS}
    best = min(found, key=lambda prefix: (prefix != IMAGES_FOLDER, prefix == "", prefix))
    return {label: found[best].get(label, {}) for label in CLASS_DIRS}


def extract_zip(archive_path: Path, images: Path, max_per_class: int | None, seed: int) -> dict[str, int]:
    """Extract the files under PetImages/{Cat,Dog}/ into `images`; returns files per class folder."""
    counts: dict[str, int] = {}
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = _member_classes(archive)
            for label, by_name in members.items():
                if not by_name:
                    where = f"{IMAGES_FOLDER}/{label}/"
                    raise DataSourceError(f"{archive_path}: no files under {where} in the archive")
                target = images / label
                target.mkdir(parents=True, exist_ok=True)
                chosen = sample(list(by_name), max_per_class, seed, label)
                for name in chosen:
                    with archive.open(by_name[name]) as src, (target / name).open("wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK_BYTES)
                counts[label] = len(chosen)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise DataSourceError(f"{archive_path}: not a valid zip archive ({exc})") from exc
    except RuntimeError as exc:
        raise DataSourceError(f"{archive_path}: cannot extract ({exc})") from exc
    return counts


def copy_folder(images_root: Path, images: Path, max_per_class: int | None, seed: int) -> dict[str, int]:
    """Hard-link (or, across file systems, copy) the files of images_root/{Cat,Dog} into `images`."""
    counts: dict[str, int] = {}
    can_link = True
    for label in CLASS_DIRS:
        source = images_root / label
        try:
            entries = {e.name: Path(e.path) for e in class_files(source)}
        except FileNotFoundError as exc:
            raise DataSourceError(f"{source}: data source folder not found; run the source stage") from exc
        if not entries:
            raise DataSourceError(f"{source}: no files in the data source folder")
        target = images / label
        target.mkdir(parents=True, exist_ok=True)
        chosen = sample(list(entries), max_per_class, seed, label)
        for name in chosen:
            if can_link:
                try:
                    os.link(entries[name], target / name)
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP):
                        raise
                    can_link = False
                    log.info("hard links not possible (%s); copying the files instead", exc.strerror)
            shutil.copy2(entries[name], target / name)
        counts[label] = len(chosen)
    return counts


@contextmanager
def staged_replace(final: Path) -> Iterator[Path]:
    """A fresh temporary sibling of `final` that replaces it by rename on success; removed on failure."""
    _remove_stale_siblings(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            if old.exists():
                old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_siblings(final: Path) -> None:
    """Remove temporary folders left by an ingest that was killed (its process no longer exists)."""
    for pattern in (f"{final.name}.tmp-*", f"{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                log.info("removing %s left by an interrupted ingest", stale)
                shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_source_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataSourceError(f"{path}: not found; run the source stage first (catdog source)") from exc
    except ValueError as exc:
        raise DataSourceError(f"{path}: not valid JSON ({exc}); run the source stage again") from exc
    if not isinstance(info, dict) or info.get("kind") not in ("url", "zip", "folder"):
        raise DataSourceError(f"{path}: unexpected content; run the source stage again")
    return info


def fetch_url(project: Project, url: str, configured: str | None) -> tuple[Path, str | None]:
    """Download `url` and check it against the configured or recorded SHA-256.

    Returns the archive and the checksum to record after a successful extraction (None if known).
    """
    archive = download(url, project.paths.downloads / download_name(url), project.params.data.download)
    if configured:
        verify(archive, configured, url, delete=True)
        return archive, None
    recorded = read_checksums(project.paths.checksums).get(url)
    if recorded:
        verify(archive, recorded, f"{url} (checksum recorded in {project.paths.checksums})", delete=True)
        return archive, None
    return archive, sha256_of(archive)


def record_checksum(checksums: Path, url: str, sha256: str) -> None:
    data = read_checksums(checksums)
    data[url] = sha256
    write_if_changed(checksums, json.dumps(data, indent=2, sort_keys=True) + "\n")
    log.info(
        "no checksum known for %s: recorded its SHA-256 %s in %s (trust on first use)", url, sha256, checksums
    )


def run(root: Path | None = None) -> None:
    """Acquire the source recorded in data/source.json into data/raw/PetImages/{Cat,Dog}."""
    start = time.monotonic()
    project = Project(root)
    paths = project.paths
    info = read_source_info(paths.source_info)
    kind, location = info["kind"], info["location"]
    max_per_class: int | None = info.get("max_per_class")
    configured: str | None = info.get("sha256")
    seed = project.params.seed
    to_record: str | None = None
    with staged_replace(paths.raw) as tmp:
        images = tmp / paths.raw_images.relative_to(paths.raw)
        if kind == "folder":
            counts = copy_folder(Path(info["images_root"]), images, max_per_class, seed)
        else:
            if kind == "url":
                archive, to_record = fetch_url(project, location, configured)
            else:
                archive = Path(location)
                if not archive.is_file():
                    raise DataSourceError(f"{archive}: data source not found; run the source stage again")
                if configured:
                    verify(archive, configured, str(archive), delete=False)
            try:
                counts = extract_zip(archive, images, max_per_class, seed)
            except DataSourceError:
                if to_record:
                    archive.unlink(missing_ok=True)
                raise
    if to_record:
        record_checksum(paths.checksums, location, to_record)
    per_class = ", ".join(f"{n} {label}" for label, n in counts.items())
    log.info(
        "ingested %s files (%s) from %s %s into %s in %.1f s",
        sum(counts.values()),
        per_class,
        kind,
        location,
        paths.raw_images,
        time.monotonic() - start,
    )

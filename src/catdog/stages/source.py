"""DVC stage `source`: resolve the data source in force and write its fingerprint to data/source.json.

The source is $DATA_SOURCE when set, else params.yaml `data.source`: a URL (http/https), a local .zip
or a local folder holding `PetImages/{Cat,Dog}` or `{Cat,Dog}`. The stage never downloads nor reads
image bytes, so it is cheap enough to run on every `dvc repro`; its output is byte-identical while
nothing changes, and `ingest` depends on it, so DVC re-runs `ingest` exactly when the source changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from catdog.config import RAW_CLASS_DIRS, Project
from catdog.errors import DataSourceError

log = logging.getLogger(__name__)

SourceKind = Literal["url", "zip", "folder"]
URL_SCHEMES = frozenset({"http", "https"})
IMAGES_FOLDER = "PetImages"
CLASS_DIRS: tuple[str, ...] = tuple(RAW_CLASS_DIRS.values())


def class_files(folder: Path) -> list[os.DirEntry[str]]:
    """The files ingest takes from one class folder: regular files, no subfolders, no hidden dotfiles."""
    with os.scandir(folder) as entries:
        return [e for e in entries if not e.name.startswith(".") and e.is_file()]


def find_images_root(folder: Path) -> Path:
    """The folder holding Cat/ and Dog/: `folder/PetImages` or `folder` itself."""
    for candidate in (folder / IMAGES_FOLDER, folder):
        if all((candidate / name).is_dir() for name in CLASS_DIRS):
            return candidate
    layout = f"{IMAGES_FOLDER}/{{{','.join(CLASS_DIRS)}}} or {{{','.join(CLASS_DIRS)}}}"
    raise DataSourceError(f"{folder}: data source folder has no {layout} subfolders")


def classify(source: str, cwd: Path | None = None) -> tuple[SourceKind, str]:
    """The kind of a source and its location: the URL, or the absolute path (relative ones resolved
    against `cwd`, default the current directory)."""
    text = source.strip()
    if not text:
        raise DataSourceError("the data source is empty: set data.source in params.yaml or $DATA_SOURCE")
    parsed = urlparse(text)
    if parsed.scheme.lower() in URL_SCHEMES:
        if not parsed.netloc:
            raise DataSourceError(f"{text}: not a valid URL (no host)")
        return "url", text
    if parsed.scheme.lower() == "file":
        text = unquote(parsed.path)
    elif len(parsed.scheme) > 1 and "://" in text:
        raise DataSourceError(
            f"{text}: unsupported scheme {parsed.scheme!r} (use http(s), a zip or a folder)"
        )
    path = Path(text).expanduser()
    path = Path(os.path.abspath(path if path.is_absolute() else (cwd or Path.cwd()) / path))
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise DataSourceError(f"{path}: data source file is not a .zip archive")
        return "zip", str(path)
    raise DataSourceError(f"{path}: data source not found (no such file or folder)")


def fingerprint_folder(images_root: Path) -> str:
    """SHA-256 over the sorted (relative path, size, mtime_ns) of every file ingest would copy."""
    rows = []
    for name in CLASS_DIRS:
        for entry in class_files(images_root / name):
            stat = entry.stat()
            rows.append(f"{name}/{entry.name}\t{stat.st_size}\t{stat.st_mtime_ns}")
    rows.sort()
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def fingerprint_zip(path: Path, sha256: str | None) -> str:
    """SHA-256 over the archive's size, mtime_ns and the configured checksum (the bytes are not read)."""
    stat = path.stat()
    return _digest({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256})


def fingerprint_url(url: str, sha256: str | None) -> str:
    """SHA-256 over the URL and the checksum it is verified against (configured or recorded)."""
    return _digest({"url": url, "sha256": sha256})


def recorded_checksum(checksums: Path, url: str) -> str | None:
    """The SHA-256 recorded for `url` in data/checksums.json, if any."""
    return read_checksums(checksums).get(url)


def read_checksums(checksums: Path) -> dict[str, str]:
    """data/checksums.json as a mapping URL -> SHA-256 (empty when the file does not exist)."""
    try:
        data = json.loads(checksums.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DataSourceError(f"{checksums}: cannot read the recorded checksums: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise DataSourceError(f"{checksums}: expected a JSON object mapping URL to SHA-256")
    return data


def describe(project: Project, cwd: Path | None = None, source: str | None = None) -> dict[str, Any]:
    """Everything data/source.json records about the source in force (or about `source` instead)."""
    data = project.params.data
    sha256 = data.sha256.strip().lower() if data.sha256 else None
    kind, location = classify(source or project.data_source(), cwd)
    images_root: str | None = None
    if kind == "url":
        expected = sha256 or recorded_checksum(project.paths.checksums, location)
        fingerprint = fingerprint_url(location, expected)
    elif kind == "zip":
        fingerprint = fingerprint_zip(Path(location), sha256)
    else:
        root = find_images_root(Path(location))
        images_root = str(root)
        fingerprint = fingerprint_folder(root)
    return {
        "kind": kind,
        "location": location,
        "images_root": images_root,
        "fingerprint": fingerprint,
        "max_per_class": data.max_per_class,
        "sha256": sha256,
    }


def to_json(info: dict[str, Any]) -> str:
    """The canonical text of data/source.json: sorted keys, no timestamps."""
    return json.dumps(info, indent=2, sort_keys=True) + "\n"


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` atomically unless the file already holds it; True when written."""
    try:
        if path.read_text() == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def run(root: Path | None = None) -> None:
    """Resolve, classify and fingerprint the data source; write data/source.json."""
    project = Project(root)
    info = describe(project)
    write_if_changed(project.paths.source_info, to_json(info))
    log.info("data source: %s %s (fingerprint %s)", info["kind"], info["location"], info["fingerprint"][:12])


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

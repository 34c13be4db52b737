"""The `ingest` stage on real photos: from a local HTTP server (with Range and dropped connections), a local
zip and folders, with checksums, sampling and an atomic data/raw."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from catdog.errors import EXIT_PERMANENT, DataSourceError, TransientError
from catdog.stages import ingest, source

ZIP_NAME = "kagglecatsanddogs_5340.zip"
PER_CLASS = 12


@dataclass(frozen=True)
class PetZip:
    """A small zip in the layout of Microsoft's kagglecatsanddogs_5340.zip and what ingest must extract."""

    path: Path
    sha256: str
    files: dict[str, bytes]


class FileServer(ThreadingHTTPServer):
    """Serves the files of `root` on 127.0.0.1 with single-range requests; can stall or drop connections."""

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root = root
        self.honour_range = True
        self.drops: list[int] = []
        self.stalls: list[float] = []
        self.requests: list[dict[str, str | None]] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class RangeHandler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        self.server.requests.append({"path": self.path, "range": self.headers.get("Range")})
        if self.server.stalls:
            time.sleep(self.server.stalls.pop(0))
        path = self.server.root / unquote(self.path.lstrip("/"))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if wanted and self.server.honour_range:
            start = int(wanted.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.drops:
            self.wfile.write(body[: self.server.drops.pop(0)])
            self.close_connection = True
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def pet_zip(tmp_path_factory: pytest.TempPathFactory, sample_images_dir: Path) -> PetZip:
    """Real photos plus the oddities of the real archive: Thumbs.db, a zero-byte jpg, top-level extras."""
    files: dict[str, bytes] = {}
    for label in ("Cat", "Dog"):
        photos = sorted((sample_images_dir / "PetImages" / label).glob("*.jpg"))[:PER_CLASS]
        files.update({f"{label}/{i}.jpg": p.read_bytes() for i, p in enumerate(photos)})
        files[f"{label}/Thumbs.db"] = b"\xd0\xcf\x11\xe0" + bytes(60)
    files["Cat/666.jpg"] = b""
    path = tmp_path_factory.mktemp("zip") / ZIP_NAME
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for folder in ("PetImages/", "PetImages/Cat/", "PetImages/Dog/"):
            zf.writestr(folder, b"")
        for rel, data in files.items():
            zf.writestr(f"PetImages/{rel}", data)
        zf.writestr("PetImages/Cat/.DS_Store", b"mac")
        zf.writestr("__MACOSX/PetImages/Cat/._0.jpg", b"mac")
        zf.writestr("CDLA-Permissive-2.0.pdf", b"%PDF-1.4 licence")
        zf.writestr("readme[1].txt", b"read me")
    return PetZip(path, hashlib.sha256(path.read_bytes()).hexdigest(), files)


@pytest.fixture
def server(tmp_path: Path, pet_zip: PetZip) -> Iterator[FileServer]:
    (tmp_path / "www").mkdir()
    shutil.copy2(pet_zip.path, tmp_path / "www" / ZIP_NAME)
    httpd = FileServer(tmp_path / "www")
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def project_factory(project_factory):
    """The shared factory with no delay between download attempts (params.yaml data.download)."""

    def make(source, *, download=None, **kwargs):
        return project_factory(source, download={"backoff_seconds": 0.0, **(download or {})}, **kwargs)

    return make


@dataclass
class FolderSource:
    path: Path
    images: Path
    files: dict[str, bytes] = field(default_factory=dict)


def make_folder_source(base: Path, sample: Path, nested: bool, per_class: int = PER_CLASS) -> FolderSource:
    """Real photos in `base/PetImages/{Cat,Dog}` (nested) or `base/{Cat,Dog}`, plus files ingest must skip."""
    images = base / "PetImages" if nested else base
    found = FolderSource(base, images)
    for label in ("Cat", "Dog"):
        (images / label / "sub").mkdir(parents=True)
        for i, photo in enumerate(sorted((sample / "PetImages" / label).glob("*.jpg"))[:per_class]):
            shutil.copy2(photo, images / label / f"{i}.jpg")
            found.files[f"{label}/{i}.jpg"] = photo.read_bytes()
        (images / label / ".DS_Store").write_bytes(b"mac")
        (images / label / "sub" / "nested.jpg").write_bytes(b"nested")
    (images / "Dog" / "Thumbs.db").write_bytes(b"thumbs")
    (images / "Dog" / "empty.jpg").write_bytes(b"")
    found.files.update({"Dog/Thumbs.db": b"thumbs", "Dog/empty.jpg": b""})
    return found


def raw_files(root: Path) -> dict[str, bytes]:
    images = root / "data" / "raw" / "PetImages"
    return {
        p.relative_to(images).as_posix(): p.read_bytes() for p in sorted(images.rglob("*")) if p.is_file()
    }


def acquire(root: Path) -> None:
    source.run(root)
    ingest.run(root)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "data").glob("raw*"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_download_records_the_checksum_on_first_use_and_verifies_it_after(
    server, pet_zip, project_factory, caplog
):
    url = server.url(ZIP_NAME)
    root = project_factory(url)
    with caplog.at_level("INFO"):
        acquire(root)
    assert raw_files(root) == pet_zip.files
    assert json.loads((root / "data" / "checksums.json").read_text()) == {url: pet_zip.sha256}
    assert "trust on first use" in caplog.text
    assert "ingested 27 files (14 Cat, 13 Dog) from url" in caplog.text
    download = root / "data" / "downloads" / ZIP_NAME
    assert download.is_file() and not download.with_name(ZIP_NAME + ".part").exists()
    assert [r["range"] for r in server.requests] == [None]

    acquire(root)
    assert len(server.requests) == 1, "the verified download is reused"
    assert raw_files(root) == pet_zip.files

    download.write_bytes(b"tampered")
    with pytest.raises(DataSourceError, match=f"expected {pet_zip.sha256} but got") as err:
        acquire(root)
    assert "checksums.json" in str(err.value)
    assert not download.exists(), "a download that fails verification is deleted"
    assert raw_files(root) == pet_zip.files, "the previous data/raw is untouched"
    assert leftovers(root) == ["raw"]


def test_wrong_configured_sha256_is_rejected_and_leaves_no_raw_data(server, pet_zip, project_factory):
    url = server.url(ZIP_NAME)
    root = project_factory(url, sha256="0" * 64)
    with pytest.raises(DataSourceError) as err:
        acquire(root)
    assert str(err.value).startswith(f"{url}: SHA-256 mismatch, expected {'0' * 64} but got {pet_zip.sha256}")
    assert leftovers(root) == []
    assert not (root / "data" / "downloads" / ZIP_NAME).exists()
    assert not (root / "data" / "checksums.json").exists()


def test_download_resumes_after_a_dropped_connection(server, pet_zip, project_factory):
    cut = pet_zip.path.stat().st_size // 3
    server.drops = [cut]
    root = project_factory(server.url(ZIP_NAME), sha256=pet_zip.sha256)
    acquire(root)
    first, second = (r["range"] for r in server.requests)
    assert first is None
    resumed_at = int(second.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= cut, "what arrived before the drop is kept (up to one read chunk is lost)"
    assert raw_files(root) == pet_zip.files


def test_a_partial_download_is_resumed_by_the_next_run(server, pet_zip, project_factory):
    root = project_factory(server.url(ZIP_NAME), sha256=pet_zip.sha256)
    part = root / "data" / "downloads" / f"{ZIP_NAME}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(pet_zip.path.read_bytes()[:1000])
    acquire(root)
    assert [r["range"] for r in server.requests] == ["bytes=1000-"]
    assert raw_files(root) == pet_zip.files


def test_a_server_ignoring_range_restarts_the_download(server, pet_zip, project_factory):
    server.honour_range = False
    server.drops = [200_000]
    root = project_factory(server.url(ZIP_NAME), sha256=pet_zip.sha256)
    acquire(root)
    first, second = (r["range"] for r in server.requests)
    assert first is None and second and second.startswith("bytes=")
    assert raw_files(root) == pet_zip.files


def test_a_stalled_server_times_out_and_is_retried(server, pet_zip, project_factory, monkeypatch):
    monkeypatch.setattr(ingest, "READ_TIMEOUT_S", 0.2)
    server.stalls = [1.0]
    root = project_factory(server.url(ZIP_NAME), sha256=pet_zip.sha256)
    acquire(root)
    assert len(server.requests) == 2
    assert raw_files(root) == pet_zip.files


def test_unreachable_url_fails_with_one_clear_message(project_factory):
    url = f"http://127.0.0.1:{closed_port()}/{ZIP_NAME}"
    root = project_factory(url, download={"attempts": 2})
    with pytest.raises(TransientError) as err:
        acquire(root)
    assert str(err.value) == f"cannot download {url}: Connection refused"
    assert leftovers(root) == []


def test_http_error_is_not_retried(server, project_factory):
    url = server.url("missing.zip")
    root = project_factory(url)
    with pytest.raises(DataSourceError, match=f"cannot download {re.escape(url)}: HTTP 404"):
        acquire(root)
    assert len(server.requests) == 1


def test_local_zip_with_checksum(pet_zip, project_factory):
    root = project_factory(pet_zip.path, sha256=pet_zip.sha256.upper())
    acquire(root)
    assert raw_files(root) == pet_zip.files

    root = project_factory(pet_zip.path, sha256="1" * 64, name="wrong")
    with pytest.raises(DataSourceError, match=f"{re.escape(str(pet_zip.path))}: SHA-256 mismatch"):
        acquire(root)
    assert pet_zip.path.is_file(), "the user's own zip is never deleted"
    assert leftovers(root) == []


@pytest.mark.parametrize("nested", [True, False], ids=["PetImages-Cat-Dog", "Cat-Dog"])
def test_folder_source_is_hard_linked(tmp_path, sample_images_dir, project_factory, nested):
    folder = make_folder_source(tmp_path / "pets", sample_images_dir, nested)
    root = project_factory(folder.path)
    acquire(root)
    assert raw_files(root) == folder.files
    copied = root / "data" / "raw" / "PetImages" / "Cat" / "0.jpg"
    assert copied.stat().st_ino == (folder.images / "Cat" / "0.jpg").stat().st_ino


def test_folder_source_falls_back_to_copies(tmp_path, sample_images_dir, project_factory, monkeypatch):
    folder = make_folder_source(tmp_path / "pets", sample_images_dir, nested=True)

    def cross_device(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    root = project_factory(folder.path)
    acquire(root)
    assert raw_files(root) == folder.files


def test_max_per_class_is_a_deterministic_per_class_sample(tmp_path, pet_zip, project_factory):
    root = project_factory(pet_zip.path, max_per_class=5)
    acquire(root)
    first = raw_files(root)
    assert sum(k.startswith("Cat/") for k in first) == sum(k.startswith("Dog/") for k in first) == 5
    assert all(pet_zip.files[k] == v for k, v in first.items())
    acquire(root)
    assert raw_files(root) == first

    reseeded = project_factory(pet_zip.path, max_per_class=5, seed=7, name="reseeded")
    acquire(reseeded)
    assert raw_files(reseeded).keys() != first.keys()

    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(pet_zip.path) as zf:
        zf.extractall(folder)
    same_names = project_factory(folder, max_per_class=5, name="from_folder")
    acquire(same_names)
    assert raw_files(same_names) == first, "the sample depends on the names, not on the kind of source"

    everything = project_factory(pet_zip.path, max_per_class=100, name="everything")
    acquire(everything)
    assert raw_files(everything) == pet_zip.files


def test_a_failure_keeps_the_previous_raw_data(tmp_path, pet_zip, project_factory):
    archive = tmp_path / "pets.zip"
    shutil.copy2(pet_zip.path, archive)
    root = project_factory(archive)
    acquire(root)
    archive.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataSourceError, match=f"{re.escape(str(archive))}: not a valid zip archive"):
        acquire(root)
    assert raw_files(root) == pet_zip.files
    assert leftovers(root) == ["raw"]


def test_zip_slip_is_refused(tmp_path, project_factory):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("PetImages/Cat/0.jpg", b"cat")
        zf.writestr("PetImages/Dog/0.jpg", b"dog")
        zf.writestr("PetImages/Cat/../../../escaped.jpg", b"evil")
    root = project_factory(archive)
    with pytest.raises(DataSourceError, match="unsafe member path"):
        acquire(root)
    assert not list(tmp_path.rglob("escaped.jpg"))
    assert leftovers(root) == []


@pytest.mark.parametrize("prefix", ["", "kagglecatsanddogs/PetImages/"], ids=["top-level", "nested"])
def test_zip_layouts_other_than_microsofts(tmp_path, project_factory, prefix):
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{prefix}Cat/0.jpg", b"cat")
        zf.writestr(f"{prefix}Dog/0.jpg", b"dog")
        zf.writestr("__MACOSX/PetImages/Cat/._0.jpg", b"mac")
    root = project_factory(archive)
    acquire(root)
    assert raw_files(root) == {"Cat/0.jpg": b"cat", "Dog/0.jpg": b"dog"}


def test_zip_without_a_class_folder_fails_clearly(tmp_path, project_factory):
    archive = tmp_path / "cats_only.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("PetImages/Cat/0.jpg", b"cat")
    root = project_factory(archive)
    with pytest.raises(DataSourceError, match=r"no files under PetImages/Dog/ in the archive"):
        acquire(root)


def test_stale_temporary_folders_are_removed(pet_zip, project_factory):
    root = project_factory(pet_zip.path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = root / "data" / f"raw.tmp-{dead.stdout.strip()}"
    (stale / "PetImages").mkdir(parents=True)
    acquire(root)
    assert leftovers(root) == ["raw"]


def test_cli_reports_a_missing_source_in_one_line(tmp_path, sample_images_dir, project_factory):
    folder = make_folder_source(tmp_path / "pets", sample_images_dir, nested=True, per_class=2)
    root = project_factory(folder.path)
    source.run(root)
    shutil.rmtree(folder.path)

    cli = [sys.executable, "-m", "catdog"]
    done = subprocess.run([*cli, "ingest", "--root", str(root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_PERMANENT, "a missing source is not worth retrying"
    assert done.stderr.startswith("error: ") and str(folder.images / "Cat") in done.stderr
    assert "Traceback" not in done.stderr
    assert not (root / "data" / "raw").exists()

    done = subprocess.run([*cli, "source", "--root", str(root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_PERMANENT
    assert done.stderr == f"error: {folder.path}: data source not found (no such file or folder)\n"

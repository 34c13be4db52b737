"""The `source` stage: classifying the data source and fingerprinting it into data/source.json."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import pytest

from catdog.errors import DataSourceError
from catdog.stages import source

URL = "https://example.org/files/kagglecatsanddogs_5340.zip"


def make_folder(base: Path, nested: bool = True, per_class: int = 3) -> Path:
    """A tiny folder source in the `PetImages/{Cat,Dog}` (nested) or `{Cat,Dog}` layout."""
    images = base / "PetImages" if nested else base
    for label in ("Cat", "Dog"):
        (images / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (images / label / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    return base


def run_source(root: Path) -> dict:
    source.run(root)
    return json.loads((root / "data" / "source.json").read_text())


@pytest.mark.parametrize("url", [URL, "http://127.0.0.1:8000/a.zip", "HTTPS://Example.org/x"])
def test_urls_are_classified_as_url(url):
    assert source.classify(url) == ("url", url)


def test_local_zip_and_folders_are_classified_with_absolute_paths(tmp_path, monkeypatch):
    archive = tmp_path / "pets.zip"
    zipfile.ZipFile(archive, "w").close()
    nested = make_folder(tmp_path / "nested")
    flat = make_folder(tmp_path / "flat", nested=False)
    monkeypatch.chdir(tmp_path)
    assert source.classify("pets.zip") == ("zip", str(archive))
    assert source.classify("./nested/../nested") == ("folder", str(nested))
    assert source.classify(f"file://{flat}") == ("folder", str(flat))
    assert source.find_images_root(nested) == nested / "PetImages"
    assert source.find_images_root(flat) == flat


def test_bad_sources_fail_naming_the_path(tmp_path):
    missing = tmp_path / "no" / "such.zip"
    with pytest.raises(DataSourceError, match="data source not found") as err:
        source.classify(str(missing))
    assert str(missing) in str(err.value)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataSourceError, match=r"notes\.txt: data source file is not a \.zip"):
        source.classify(str(tmp_path / "notes.txt"))
    with pytest.raises(DataSourceError, match="unsupported scheme 's3'"):
        source.classify("s3://bucket/pets.zip")
    (tmp_path / "only_cats" / "Cat").mkdir(parents=True)
    with pytest.raises(DataSourceError, match=r"only_cats: data source folder has no PetImages/\{Cat,Dog\}"):
        source.find_images_root(tmp_path / "only_cats")


def test_params_source_is_recorded(project_factory, tmp_path):
    folder = make_folder(tmp_path / "pets")
    root = project_factory(folder, max_per_class=2)
    info = run_source(root)
    assert info == {
        "kind": "folder",
        "location": str(folder),
        "images_root": str(folder / "PetImages"),
        "fingerprint": source.fingerprint_folder(folder / "PetImages"),
        "max_per_class": 2,
        "sha256": None,
    }


def test_env_overrides_params(project_factory, tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "pets", nested=False)
    root = project_factory(URL, sha256="AB" * 32)
    info = run_source(root)
    assert (info["kind"], info["location"], info["sha256"]) == ("url", URL, "ab" * 32)
    monkeypatch.setenv("DATA_SOURCE", str(folder))
    info = run_source(root)
    assert (info["kind"], info["location"], info["images_root"]) == ("folder", str(folder), str(folder))


def test_url_fingerprint_follows_the_recorded_checksum(project_factory):
    root = project_factory(URL)
    first = run_source(root)["fingerprint"]
    (root / "data" / "checksums.json").write_text(json.dumps({URL: "cd" * 32}))
    assert run_source(root)["fingerprint"] != first


def test_output_is_byte_identical_until_a_file_changes(project_factory, tmp_path):
    folder = make_folder(tmp_path / "pets")
    root = project_factory(folder)
    run_source(root)
    out = root / "data" / "source.json"
    before, before_mtime = out.read_bytes(), out.stat().st_mtime_ns
    run_source(root)
    assert out.read_bytes() == before
    assert out.stat().st_mtime_ns == before_mtime, "an unchanged file is not rewritten"

    (folder / "PetImages" / ".DS_Store").write_bytes(b"ignored")
    (folder / "PetImages" / "Cat" / ".DS_Store").write_bytes(b"ignored")
    assert out.read_bytes() == before
    (folder / "PetImages" / "Dog" / "new.jpg").write_bytes(b"new")
    added = run_source(root)["fingerprint"]
    assert added != json.loads(before)["fingerprint"]
    os.utime(folder / "PetImages" / "Dog" / "new.jpg", ns=(1, 1))
    assert run_source(root)["fingerprint"] != added


def test_zip_fingerprint_changes_with_the_file_and_the_checksum(project_factory, tmp_path):
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("PetImages/Cat/0.jpg", b"cat")
    root = project_factory(archive)
    first = run_source(root)
    assert (first["kind"], first["location"]) == ("zip", str(archive))
    assert run_source(root) == first
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("PetImages/Dog/0.jpg", b"dog")
    second = run_source(root)
    assert second["fingerprint"] != first["fingerprint"]
    root = project_factory(archive, sha256="ef" * 32)
    assert run_source(root)["fingerprint"] != second["fingerprint"]


def test_fingerprinting_many_files_is_fast(tmp_path):
    folder = tmp_path / "PetImages"
    for label in ("Cat", "Dog"):
        (folder / label).mkdir(parents=True)
        for i in range(2500):
            (folder / label / f"{i}.jpg").touch()
    started = time.perf_counter()
    source.fingerprint_folder(folder)
    assert time.perf_counter() - started < 2.0

"""The validate stage on a raw folder with planted problems: it finds each of them, and only them."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import fuzz_images
import odd_images
import pytest
import yaml

from catdog import preprocessing
from catdog.config import ValidateParams
from catdog.errors import EXIT_GATE, QualityGateError
from catdog.stages import validate

PARAMS = ValidateParams(min_side=32, max_pixels=50_000_000, near_duplicate_distance=4)


def near_copy(seed: int) -> bytes:
    """The same picture as odd_images.jpeg(seed), resized and re-encoded at a lower quality."""
    return odd_images.jpeg(seed, size=(300, 225), quality=60)


PLANTED: dict[str, tuple[bytes, set[str]]] = {
    "Cat/zero.jpg": (b"", {"zero_byte"}),
    "Cat/truncated.jpg": (odd_images.truncated_jpeg(20), {"truncated"}),
    "Cat/notes.jpg": (odd_images.TEXT, {"not_an_image"}),
    "Cat/document.jpg": (odd_images.PDF, {"not_an_image"}),
    "Cat/Thumbs.db": (odd_images.random_bytes(), {"not_an_image"}),
    "Cat/png_named.jpg": (odd_images.png(21), {"wrong_extension"}),
    "Cat/cmyk.jpg": (odd_images.cmyk_jpeg(22), {"cmyk"}),
    "Cat/gray.jpg": (odd_images.grayscale_jpeg(23), {"grayscale"}),
    "Cat/palette.png": (odd_images.palette_png(24), {"palette"}),
    "Cat/alpha.png": (odd_images.rgba_png(25), {"alpha"}),
    "Cat/deep.png": (odd_images.png16(26), {"grayscale", "16bit"}),
    "Cat/anim.gif": (odd_images.animated_gif(27), {"palette", "animated"}),
    "Cat/tiny.jpg": (odd_images.tiny_jpeg(30), {"too_small"}),
    "Cat/bomb.png": (odd_images.bomb_png(), {"decompression_bomb"}),
    "Cat/copy_of_c0.jpg": (odd_images.jpeg(0), {"exact_duplicate"}),
    "Cat/near_c1.jpg": (near_copy(1), {"near_duplicate"}),
    "Dog/copy_of_c2.jpg": (odd_images.jpeg(2), {"label_conflict"}),
    "Dog/near_c3.jpg": (near_copy(3), {"label_conflict"}),
}
# Problems the planted files give their clean originals.
ORIGINALS = {
    "Cat/c1.jpg": {"near_duplicate"},
    "Cat/c2.jpg": {"label_conflict"},
    "Cat/c3.jpg": {"label_conflict"},
}


@pytest.fixture
def planted_raw(tmp_path: Path) -> Path:
    images = tmp_path / "raw" / "PetImages"
    for i in range(10):
        (images / "Cat").mkdir(parents=True, exist_ok=True)
        (images / "Dog").mkdir(parents=True, exist_ok=True)
        (images / f"Cat/c{i}.jpg").write_bytes(odd_images.jpeg(i))
        (images / f"Dog/d{i}.jpg").write_bytes(odd_images.jpeg(100 + i))
    for rel, (data, _) in PLANTED.items():
        (images / rel).write_bytes(data)
    return images


def test_each_planted_problem_is_found_and_only_those(planted_raw):
    records = validate.validate_folder(planted_raw, PARAMS, workers=1)
    found = {r.path.removeprefix("PetImages/"): set(r.problems) for r in records}
    expected = {rel: problems for rel, (_, problems) in PLANTED.items()}
    expected |= ORIGINALS
    for rel in found:
        expected.setdefault(rel, set())
    assert found == expected


def test_usable_flags_and_groups(planted_raw):
    records = {r.path.removeprefix("PetImages/"): r for r in validate.validate_folder(planted_raw, PARAMS, 1)}
    assert records["Cat/c0.jpg"].usable and not records["Cat/copy_of_c0.jpg"].usable
    assert records["Cat/cmyk.jpg"].usable and records["Cat/png_named.jpg"].usable
    assert not records["Cat/c2.jpg"].usable and not records["Dog/copy_of_c2.jpg"].usable
    assert records["Cat/c1.jpg"].group == records["Cat/near_c1.jpg"].group
    assert records["Cat/c1.jpg"].group != records["Cat/c4.jpg"].group


def test_hamming_pairs_match_brute_force():
    import numpy as np

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    hashes[5] = hashes[7] ^ np.uint64(0b1011)
    hashes[9] = hashes[100]
    pairs = set(validate.hamming_pairs(hashes, 3, chunk=64))
    brute = {
        (i, j)
        for i in range(300)
        for j in range(i + 1, 300)
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 3
    }
    assert pairs == brute and {(5, 7), (9, 100)} <= pairs


def make_project(tmp_path: Path, raw_images: Path, **validate_params) -> Path:
    root = tmp_path / "project"
    (root / "data" / "raw").mkdir(parents=True)
    shutil.copytree(raw_images, root / "data" / "raw" / "PetImages")
    params = yaml.safe_load((Path(__file__).parents[2] / "params.yaml").read_text())
    params["validate"].update(validate_params)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_stage_writes_reports_and_passes_within_thresholds(tmp_path, planted_raw):
    root = make_project(tmp_path, planted_raw, max_unusable_fraction=0.5, max_class_imbalance=2.0)
    report = validate.run(root)
    saved = json.loads((root / "reports" / "validation.json").read_text())
    assert saved["total"] == report["total"] == 20 + len(PLANTED)
    assert saved["problems"]["truncated"] == {"cat": 1, "dog": 0}
    assert saved["problems"]["label_conflict"] == {"cat": 2, "dog": 2}
    assert saved["files"]["decompression_bomb"] == ["PetImages/Cat/bomb.png"]
    quarantined = {q["path"] for q in saved["quarantine"]}
    assert "PetImages/Cat/zero.jpg" in quarantined and "PetImages/Cat/cmyk.jpg" not in quarantined
    assert saved["passed"] is True
    summary = (root / "reports" / "validation.md").read_text()
    assert "| truncated | 1 | 0 | unusable |" in summary
    assert "| cmyk | 1 | 0 | converted |" in summary
    table = validate.read_image_table(root / "reports" / "validation_images.csv")
    assert len(table) == saved["total"]
    assert (planted_raw / "Cat" / "zero.jpg").exists(), "raw files are never deleted"


def test_stage_fails_when_unusable_fraction_crosses_the_threshold(tmp_path, planted_raw):
    root = make_project(tmp_path, planted_raw, max_unusable_fraction=0.1)
    with pytest.raises(QualityGateError, match="max_unusable_fraction"):
        validate.run(root)
    assert (root / "reports" / "validation.md").is_file(), "the report is written even when the gate fails"
    done = subprocess.run(
        [sys.executable, "-m", "catdog", "validate", "--root", str(root)], capture_output=True, text=True
    )
    assert done.returncode == EXIT_GATE
    assert "error: data validation failed: max_unusable_fraction" in done.stderr
    assert "Traceback" not in done.stderr


def test_stage_fails_on_class_imbalance(tmp_path, planted_raw):
    for i in range(4, 10):
        (planted_raw / f"Dog/d{i}.jpg").unlink()
    root = make_project(tmp_path, planted_raw, max_unusable_fraction=1.0, max_class_imbalance=1.5)
    with pytest.raises(QualityGateError, match="max_class_imbalance"):
        validate.run(root)


# ---- every decoder failure is classified, in the process pool too ----
# Faults that the real decoders cannot be made to produce on demand (a parser exception escaping
# preprocessing, a segfault, an out-of-memory) are planted by wrapping preprocessing.decode in the test
# process: the pool's workers are forked from it, so they run the wrapper for real, and a planted segfault
# kills a real worker.
CRASH, RAISE, OOM = b"segfault-me", b"raise-me", b"out-of-memory-me"
forked_workers = pytest.mark.skipif(
    multiprocessing.get_start_method() != "fork", reason="the planted faults reach forked workers only"
)


def marked_jpeg(seed: int, marker: bytes) -> bytes:
    """A valid JPEG carrying `marker` in its comment segment (the planted fault's trigger), of a picture
    unlike pool_raw's."""
    return odd_images.encode(odd_images.photo(1000 + seed, (64, 48)), "JPEG", quality=80, comment=marker)


@pytest.fixture
def pool_raw(tmp_path: Path) -> Path:
    """72 small valid photos, more than one chunk of work for each of two workers."""
    images = tmp_path / "pool" / "PetImages"
    for folder, offset in (("Cat", 0), ("Dog", 500)):
        (images / folder).mkdir(parents=True)
        for i in range(36):
            (images / folder / f"p{i:02d}.jpg").write_bytes(odd_images.jpeg(offset + i, size=(64, 48)))
    return images


def plant_decoder_faults(monkeypatch: pytest.MonkeyPatch, once_marker: Path | None = None) -> None:
    """Make decode crash, raise or run out of memory on files carrying a marker (CRASH only once when
    `once_marker` is given: the file that first crashed is then decoded normally, as after an OOM kill)."""
    real_decode = preprocessing.decode

    def faulty_decode(source, **kwargs):
        data = bytes(source)
        if CRASH in data and not (once_marker and once_marker.exists()):
            if once_marker:
                once_marker.touch()
            os.kill(os.getpid(), signal.SIGSEGV)
        if RAISE in data:
            raise struct.error("unpack requires a buffer of 4 bytes")
        if OOM in data:
            raise MemoryError
        return real_decode(source, **kwargs)

    monkeypatch.setattr(preprocessing, "decode", faulty_decode)


def by_name(records: list[validate.ImageRecord]) -> dict[str, validate.ImageRecord]:
    return {r.path.removeprefix("PetImages/"): r for r in records}


@forked_workers
def test_a_decoder_exception_in_a_worker_is_classified_not_raised(pool_raw, monkeypatch):
    (pool_raw / "Cat" / "raises.jpg").write_bytes(marked_jpeg(1, RAISE))
    plant_decoder_faults(monkeypatch)
    records = by_name(validate.validate_folder(pool_raw, PARAMS, workers=2))
    assert len(records) == 73
    bad = records["Cat/raises.jpg"]
    assert bad.problems == ["corrupt"] and not bad.usable
    assert bad.detail == "corrupt: struct.error: unpack requires a buffer of 4 bytes"
    assert all(r.usable for name, r in records.items() if name != "Cat/raises.jpg")


@forked_workers
def test_a_worker_crash_quarantines_that_file_and_loses_no_other(pool_raw, monkeypatch, caplog):
    (pool_raw / "Cat" / "p05_crash.jpg").write_bytes(marked_jpeg(2, CRASH))
    (pool_raw / "Dog" / "oom.jpg").write_bytes(marked_jpeg(3, OOM))
    plant_decoder_faults(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=validate.__name__):
        records = by_name(validate.validate_folder(pool_raw, PARAMS, workers=2))
    assert len(records) == 74, "every file has its record, also those in the crashed worker's chunk"
    crashed, oom = records["Cat/p05_crash.jpg"], records["Dog/oom.jpg"]
    assert crashed.problems == ["decoder_crashed"] and "crashed" in crashed.detail
    assert oom.problems == ["decoder_crashed"] and "out of memory" in oom.detail
    assert (pool_raw / "Cat" / "p05_crash.jpg").is_file(), "quarantine never deletes"
    others = [r for name, r in records.items() if name not in {"Cat/p05_crash.jpg", "Dog/oom.jpg"}]
    assert all(r.usable and r.dhash is not None for r in others)
    assert "PetImages/Cat/p05_crash.jpg" in caplog.text and "PetImages/Dog/oom.jpg" in caplog.text


@forked_workers
def test_a_crash_that_does_not_recur_alone_keeps_the_file(pool_raw, monkeypatch, tmp_path):
    (pool_raw / "Dog" / "p07_flaky.jpg").write_bytes(marked_jpeg(4, CRASH))
    plant_decoder_faults(monkeypatch, once_marker=tmp_path / "crashed-once")
    records = by_name(validate.validate_folder(pool_raw, PARAMS, workers=2))
    assert (tmp_path / "crashed-once").exists(), "the worker did crash"
    assert len(records) == 73 and all(r.usable for r in records.values())


@forked_workers
def test_the_stage_reports_a_crashed_file_with_its_reason(tmp_path, pool_raw, monkeypatch):
    (pool_raw / "Cat" / "crash.jpg").write_bytes(marked_jpeg(5, CRASH))
    root = make_project(tmp_path, pool_raw, max_unusable_fraction=0.5)
    plant_decoder_faults(monkeypatch)
    validate.run(root)
    saved = json.loads((root / "reports" / "validation.json").read_text())
    assert saved["files"]["decoder_crashed"] == ["PetImages/Cat/crash.jpg"]
    [entry] = saved["quarantine"]
    assert entry["path"] == "PetImages/Cat/crash.jpg" and "crashed" in entry["detail"]
    summary = (root / "reports" / "validation.md").read_text()
    assert f"- `PetImages/Cat/crash.jpg`: decoder_crashed ({entry['detail']})" in summary


# ---- a file that cannot be read is classified, and costs no other file its record ----
def test_the_stage_reports_unreadable_files_and_keeps_the_good_photos(tmp_path, pool_raw):
    root = make_project(tmp_path, pool_raw, max_unusable_fraction=0.5)
    # Root reads through chmod 000: a dangling link and a link to a folder raise OSError for anyone.
    (root / "data/raw/PetImages/Cat/gone.jpg").symlink_to("missing.jpg")
    (root / "data/raw/PetImages/Dog/folder.jpg").symlink_to(root / "data")
    report = validate.run(root)
    saved = json.loads((root / "reports" / "validation.json").read_text())
    assert saved["files"]["unreadable"] == ["PetImages/Cat/gone.jpg", "PetImages/Dog/folder.jpg"]
    details = {q["path"]: q["detail"] for q in saved["quarantine"]}
    assert details == {
        "PetImages/Cat/gone.jpg": "unreadable: FileNotFoundError: No such file or directory",
        "PetImages/Dog/folder.jpg": "unreadable: IsADirectoryError: not a regular file (a link to a folder, "
        "a pipe or a device)",
    }
    assert report["total"] == 74 and report["usable"] == 72
    summary = (root / "reports" / "validation.md").read_text()
    assert "| unreadable | 1 | 1 | unusable |" in summary
    assert (root / "data/raw/PetImages/Cat/gone.jpg").is_symlink(), "quarantine never deletes"


def test_a_file_removed_during_the_run_is_unreadable_not_raised(tmp_path):
    record = validate.inspect_file(tmp_path / "removed.jpg", "cat", "PetImages/Cat/removed.jpg", PARAMS)
    assert record.problems == ["unreadable"] and not record.usable
    assert record.detail == "unreadable: FileNotFoundError: No such file or directory"
    crashed = validate._crashed(
        (str(tmp_path / "removed.jpg"), "cat", "PetImages/Cat/removed.jpg", PARAMS), "x"
    )
    assert crashed.problems == ["decoder_crashed"] and crashed.bytes == 0


@forked_workers
def test_a_chunk_that_raises_is_rerun_file_by_file(pool_raw, monkeypatch, caplog):
    """An unexpected exception that fails a whole chunk must not stop the stage: the chunk's files are
    re-run alone, and a file that raises alone too is quarantined with the reason."""
    real_inspect = validate.inspect_file

    def failing_inspect(path, *args):
        if "p03" in path.name:
            raise RuntimeError("planted failure")
        return real_inspect(path, *args)

    # Workers are forked from the test process and look inspect_file up at call time: they run the plant.
    monkeypatch.setattr(validate, "inspect_file", failing_inspect)
    with caplog.at_level(logging.WARNING, logger=validate.__name__):
        records = by_name(validate.validate_folder(pool_raw, PARAMS, workers=2))
    assert len(records) == 72
    for name in ("Cat/p03.jpg", "Dog/p03.jpg"):
        assert records[name].problems == ["decoder_crashed"]
        assert "RuntimeError: planted failure" in records[name].detail
    assert all(r.usable for name, r in records.items() if "p03" not in name)
    assert "re-run one at a time" in caplog.text


# ---- a real run over fuzzed files and real photos ----
EXTENSIONS = {"jpeg": ".jpg", "mpo": ".jpg", "png": ".png", "gif": ".gif", "webp": ".webp", "bmp": ".bmp"}
EXTENSIONS["tiff"] = ".tif"


def expected_problem(data: bytes, params: ValidateParams) -> str | None:
    """What decoding alone says about a file (None: it decodes), as validate must report it."""
    try:
        preprocessing.inspect(data, max_pixels=params.max_pixels)
        preprocessing.decode(data, max_pixels=params.max_pixels, min_side=params.min_side)
    except preprocessing.ImageDecodeError as exc:
        return validate._DECODE_CODES[exc.code]
    return None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's on corrupt metadata, from expected_problem
def test_stage_over_fuzzed_files_and_real_photos(tmp_path, sample_images_dir):
    """`python -m catdog validate` on real photos plus mutated images of every format: it completes,
    quarantines each undecodable file with its reason, and keeps every photo."""
    images = tmp_path / "raw" / "PetImages"
    photos = {}
    for folder in ("Cat", "Dog"):
        (images / folder).mkdir(parents=True)
        for path in sorted((sample_images_dir / "PetImages" / folder).glob("*.jpg"))[:30]:
            shutil.copy(path, images / folder / path.name)
            photos[f"PetImages/{folder}/{path.name}"] = path
    fuzzed = {}
    corpus = [
        *fuzz_images.valid_images().items(),
        *list(fuzz_images.regressions().items())[::8],
        *(fuzz_images.case(11, i) for i in range(120)),
    ]
    for i, (name, data) in enumerate(corpus):
        source = next(part for part in name.split(":") if part in fuzz_images.valid_images())
        # all under Cat: mutated copies of one picture filed under both labels would be label conflicts
        rel = f"Cat/fuzz{i:03d}{EXTENSIONS[source.split('-')[0]]}"
        (images / rel).write_bytes(data)
        fuzzed[f"PetImages/{rel}"] = (name, data)
    root = make_project(tmp_path, images, max_unusable_fraction=1.0, max_class_imbalance=10.0)
    params = ValidateParams(**yaml.safe_load((root / "params.yaml").read_text())["validate"])

    done = subprocess.run(
        [sys.executable, "-m", "catdog", "validate", "--root", str(root)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((root / "reports" / "validation.json").read_text())
    assert report["total"] == len(photos) + len(fuzzed)
    quarantine = {q["path"]: q for q in report["quarantine"]}
    refused = 0
    for rel, (name, data) in fuzzed.items():
        problem, entry = expected_problem(data, params), quarantine.get(rel)
        if problem is not None:
            refused += 1
            assert entry is not None, f"{name} ({problem}) not quarantined"
            assert problem in entry["problems"] and entry["detail"], (name, entry)
        elif entry is not None:  # a decodable file is only left out as a copy of another one
            assert "exact_duplicate" in entry["problems"], (name, entry)
            assert not set(entry["problems"]) & set(validate.UNUSABLE), (name, entry)
    assert refused >= 40, "the corpus exercises the decoders' error paths"
    assert not photos.keys() & quarantine.keys(), "every real photo is kept"
    for rel, photo in photos.items():
        assert (root / "data" / "raw" / rel).read_bytes() == photo.read_bytes()
    summary = (root / "reports" / "validation.md").read_text()
    assert all(f"- `{rel}`: " in summary for rel in quarantine)

"""The validate stage on a raw folder with planted problems: it finds each of them, and only them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import odd_images
import pytest
import yaml

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

"""Fuzz of the decode path: valid and mutated images of every accepted format never raise anything but
ImageDecodeError from preprocessing, and never raise at all from validate's per-file check.

Seed 0 and a budget of CATDOG_FUZZ_SECONDS (default 20) seconds, shared by the two fuzz tests; raise it for a
longer hunt, e.g. `CATDOG_FUZZ_SECONDS=600 .venv/bin/pytest -n 0 tests/unit/test_fuzz_decode.py`. A failure
names each case (`<seed>:<index>:<source>:<mutations>`), replayed alone by `fuzz_images.case(seed, index)`.
"""

from __future__ import annotations

import io
import os
import random
import traceback
import warnings
import zlib
from pathlib import Path

import fuzz_images
import pytest
from PIL import Image

from catdog import preprocessing
from catdog.config import ValidateParams
from catdog.stages import validate

SEED = 0
BUDGET = float(os.environ.get("CATDOG_FUZZ_SECONDS", "20"))
# Small enough that a mutated header claiming a huge picture is refused before decoding (fast, low memory).
MAX_PIXELS = 2_000_000
PARAMS = ValidateParams(min_side=32, max_pixels=MAX_PIXELS)
DECODE_PROBLEMS = set(validate._DECODE_CODES.values()) | {"corrupt", "decoder_crashed"}


@pytest.fixture(autouse=True)
def _quiet_pillow():
    """Pillow warns on most corrupt files (EXIF, tag sizes): thousands of lines that say nothing here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def escape_report(escapes: list[tuple[str, BaseException]]) -> str:
    lines = [f"{len(escapes)} case(s) raised something else than ImageDecodeError:"]
    for name, exc in escapes[:10]:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        lines.append(f"  {name}: {type(exc).__name__}: {exc} ({frame.filename}:{frame.lineno})")
    return "\n".join(lines)


def test_the_corpus_covers_every_accepted_format_and_is_deterministic():
    formats = set()
    for data in fuzz_images.valid_images().values():
        with Image.open(io.BytesIO(data)) as img:
            formats.add(img.format)
    mpo_skipped = "mpo" not in fuzz_images.valid_images()  # only when this Pillow cannot write MPO
    assert formats == set(preprocessing.SUPPORTED_FORMATS) - ({"MPO"} if mpo_skipped else set())
    assert fuzz_images.case(3, 17) == fuzz_images.case(3, 17)
    assert fuzz_images.case(3, 17) != fuzz_images.case(4, 17)
    first = list(fuzz_images.cases(seed=5, budget=60, limit=50))
    again = list(fuzz_images.cases(seed=5, budget=60, limit=50))
    fixed = len(fuzz_images.valid_images()) + len(fuzz_images.regressions())
    assert first == again and len(first) == fixed + 50
    kinds = {name.rsplit(":", 1)[1] for name, _ in first[-50:]}
    assert {"field", "bitflip", "truncate"} <= {k for kind in kinds for k in kind.split("+")}


def test_mutate_keeps_png_checksums_valid_so_the_parser_sees_the_damage():
    rng = random.Random(1)
    png = fuzz_images.valid_images()["png-rgb"]
    fixed = 0
    for _ in range(50):
        _, data = fuzz_images.mutate(png, rng)
        if data[:8] == fuzz_images.MAGIC["png"]:
            chunks = fuzz_images._png_chunks(data)
            fixed += all(
                data[end - 4 : end] == zlib.crc32(data[start + 4 : end - 4]).to_bytes(4, "big")
                for start, end in chunks
            )
    assert fixed >= 25


@pytest.mark.slow
def test_fuzz_preprocessing_raises_only_image_decode_error():
    escapes: list[tuple[str, BaseException]] = []
    outcomes = {"decoded": 0, "refused": 0}
    for name, data in fuzz_images.cases(seed=SEED, budget=BUDGET / 2):
        try:
            info = preprocessing.inspect(data, max_pixels=MAX_PIXELS)
            assert info.format in preprocessing.SUPPORTED_FORMATS
            img = preprocessing.decode(data, max_pixels=MAX_PIXELS)
            assert img.mode == "RGB"
            preprocessing.dhash(img)
            outcomes["decoded"] += 1
        except preprocessing.ImageDecodeError as exc:
            assert exc.code and exc.message
            outcomes["refused"] += 1
        except Exception as exc:  # collecting every escape is the point of the test
            escapes.append((name, exc))
    print(f"fuzz preprocessing: {outcomes} in {BUDGET / 2:.0f} s")
    assert not escapes, escape_report(escapes)
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0


@pytest.mark.slow
def test_fuzz_validate_check_classifies_every_file(tmp_path: Path):
    """validate's per-file check (the function the process pool runs) never raises on any content."""
    target = tmp_path / "Cat"
    target.mkdir()
    escapes: list[tuple[str, BaseException]] = []
    problems: dict[str, int] = {}
    for index, (name, data) in enumerate(fuzz_images.cases(seed=SEED + 1, budget=BUDGET / 2)):
        path = target / f"{index}.jpg"
        path.write_bytes(data)
        try:
            record = validate.inspect_file(path, "cat", f"Cat/{index}.jpg", PARAMS)
        except Exception as exc:
            escapes.append((name, exc))
            continue
        found = DECODE_PROBLEMS & set(record.problems)
        assert len(found) <= 1, (name, record.problems)
        if found:
            assert record.detail, f"{name}: {record.problems} without a reason"
            assert record.dhash is None
        else:
            assert record.format in preprocessing.SUPPORTED_FORMATS and record.dhash is not None, name
        for problem in found or {"decoded"}:
            problems[problem] = problems.get(problem, 0) + 1
    print(f"fuzz validate.inspect_file: {problems}")
    assert not escapes, escape_report(escapes)

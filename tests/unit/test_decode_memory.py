"""Decoding memory is bounded by design: every worst-case small file of each format and mode decodes
within the estimate the service budgets it by, measured as the peak resident memory of a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import worst_images

REPO = Path(__file__).resolve().parents[2]
MEASURE = """
import gc, json, resource, sys
sys.path[:0] = [{repo!r} + "/tests", {repo!r}]
import worst_images
from catdog import preprocessing
name = sys.argv[1]
data = worst_images.worst(name)
preprocessing.decode(worst_images.MAKERS[name](64), size=224)  # warm the code paths
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
plan = preprocessing.plan_decode(data, size=224)
picture = plan.run()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"bytes": len(data), "peak": after - before, "estimate": plan.cost_bytes,
                   "mode": plan.image.mode, "size": list(picture.size), "picture_mode": picture.mode}}))
"""
MiB = 2**20


def _measure(name: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE.format(repo=str(REPO)), name],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(worst_images.MAKERS))
def test_a_decode_never_holds_more_than_its_estimate(name: str) -> None:
    found = _measure(name)
    print(
        f"{name}: {found['bytes'] / 1e3:.0f} KB file, peak {found['peak'] / MiB:.0f} MiB, "
        f"estimate {found['estimate'] / MiB:.0f} MiB"
    )
    assert found["size"] == [224, 224] and found["picture_mode"] == "RGB"
    assert found["peak"] <= found["estimate"], f"{name} peaked at {found['peak'] / MiB:.0f} MiB"


def test_the_worst_small_file_now_costs_a_third_of_what_it_did() -> None:
    """The 49 KB transparent palette PNG of the report: P -> RGBA -> composite -> RGB held ~800 MiB."""
    found = _measure("png_palette_transparent")
    assert found["bytes"] < 100_000
    assert found["peak"] < 300 * MiB

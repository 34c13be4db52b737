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
import gc, json, sys
sys.path[:0] = [{repo!r} + "/tests", {repo!r}]
import worst_images
from catdog import preprocessing

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

name, path = sys.argv[1], sys.argv[2]
with open(path, "rb") as handle:
    data = handle.read()  # made by the parent: generating it here would raise the peak before measuring
preprocessing.decode(worst_images.MAKERS[name](64), size=224)  # warm the code paths
gc.collect()
# ru_maxrss is inherited from the parent across fork and exec; VmHWM is this process's own peak, and
# writing 5 to clear_refs resets it to the current RSS (Linux 4.0+).
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS")
plan = preprocessing.plan_decode(data, size=224)
picture = plan.run()
peak = status("VmHWM")
print(json.dumps({{"bytes": len(data), "peak": peak - before, "estimate": plan.cost_bytes,
                   "mode": plan.image.mode, "size": list(picture.size), "picture_mode": picture.mode}}))
"""
MiB = 2**20


def _measure(name: str, folder: Path) -> dict:
    path = folder / name
    path.write_bytes(worst_images.worst(name))
    done = subprocess.run(
        [sys.executable, "-c", MEASURE.format(repo=str(REPO)), name, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(worst_images.MAKERS))
def test_a_decode_never_holds_more_than_its_estimate(name: str, tmp_path: Path) -> None:
    found = _measure(name, tmp_path)
    print(
        f"{name}: {found['bytes'] / 1e3:.0f} KB file, peak {found['peak'] / MiB:.0f} MiB, "
        f"estimate {found['estimate'] / MiB:.0f} MiB"
    )
    assert found["size"] == [224, 224] and found["picture_mode"] == "RGB"
    assert found["peak"] <= found["estimate"], f"{name} peaked at {found['peak'] / MiB:.0f} MiB"


def test_the_worst_small_file_now_costs_a_third_of_what_it_did(tmp_path: Path) -> None:
    """The 49 KB transparent palette PNG of the report: P -> RGBA -> composite -> RGB held ~800 MiB."""
    found = _measure("png_palette_transparent", tmp_path)
    assert found["bytes"] < 100_000
    assert found["peak"] < 300 * MiB

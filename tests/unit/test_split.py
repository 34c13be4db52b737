"""The deterministic, stratified, leak-free split of `prepare`."""

from __future__ import annotations

import hashlib
from collections import Counter

from catdog.config import SplitParams
from catdog.stages.prepare import assign_splits, output_names

FRACTIONS = SplitParams(train=0.8, val=0.1, test=0.1)


def rows(n_per_class: int = 500, group_every: int = 7) -> list[dict[str, str]]:
    """Fake validation rows; every `group_every`-th image shares a near-duplicate group with the next two."""
    out = []
    for label in ("cat", "dog"):
        for i in range(n_per_class):
            sha = hashlib.sha256(f"{label}{i}".encode()).hexdigest()
            anchor = i - i % group_every
            group = f"{label}-g{anchor}" if i % group_every < 3 else sha[:16]
            out.append(
                {
                    "path": f"PetImages/{label.title()}/{i}.jpg",
                    "label": label,
                    "sha256": sha,
                    "group": group,
                    "usable": "1",
                }
            )
    return out


def test_split_is_deterministic_and_depends_on_the_seed():
    data = rows()
    assert assign_splits(data, FRACTIONS, seed=1) == assign_splits(list(reversed(data)), FRACTIONS, seed=1)
    assert assign_splits(data, FRACTIONS, seed=1) != assign_splits(data, FRACTIONS, seed=2)


def test_split_is_stratified_80_10_10():
    data = rows()
    splits = assign_splits(data, FRACTIONS, seed=42)
    counts = Counter((row["label"], splits[row["path"]]) for row in data)
    for label in ("cat", "dog"):
        assert abs(counts[(label, "train")] - 400) <= 3
        assert abs(counts[(label, "val")] - 50) <= 3
        assert abs(counts[(label, "test")] - 50) <= 3


def test_near_duplicate_groups_never_straddle_splits():
    data = rows()
    splits = assign_splits(data, FRACTIONS, seed=42)
    by_group: dict[str, set[str]] = {}
    for row in data:
        by_group.setdefault(row["group"], set()).add(splits[row["path"]])
    multi = [g for g in by_group if g.startswith(("cat-g", "dog-g"))]
    assert len(multi) > 100
    assert all(len(by_group[g]) == 1 for g in by_group)


def test_adding_images_keeps_existing_assignments():
    data = rows(400)
    before = assign_splits(data, FRACTIONS, seed=42)
    after = assign_splits(rows(440), FRACTIONS, seed=42)
    moved = sum(before[path] != after[path] for path in before)
    assert moved / len(before) < 0.1, "the split is content-hashed, so new images barely move old ones"


def test_output_names_are_unique_per_class_folder():
    data = [
        {"path": "PetImages/Cat/1.jpg", "label": "cat", "sha256": "a" * 64},
        {"path": "PetImages/Cat/1.png", "label": "cat", "sha256": "b" * 64},
        {"path": "PetImages/Dog/1.jpg", "label": "dog", "sha256": "c" * 64},
    ]
    names = output_names(data)
    assert names == {
        "PetImages/Cat/1.jpg": "1-aaaaaaaa.jpg",
        "PetImages/Cat/1.png": "1-bbbbbbbb.jpg",
        "PetImages/Dog/1.jpg": "1.jpg",
    }

"""A tool the tests need is missing (Docker, Chromium, kubectl...): outside CI the test skips and says why;
under CI (CI=true, as GitHub Actions and .ci/run set it) it fails, so a run cannot pass with a whole group of
tests skipped."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing_tool(reason: str, *, allow_module_level: bool = False) -> NoReturn:
    """Skip with `reason`, or fail with it under CI."""
    if under_ci():
        pytest.fail(
            f"{reason} (CI=true: a missing tool fails the run instead of skipping tests)", pytrace=False
        )
    pytest.skip(reason, allow_module_level=allow_module_level)

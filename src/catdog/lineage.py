"""Where a model comes from: the DVC version of the processed data and the git state of the code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

PROCESSED_OUT = "data/processed"


def data_version(dvc_lock: Path, out: str = PROCESSED_OUT) -> str | None:
    """The DVC hash (md5 of the directory listing) recorded in dvc.lock for `out`, if it has one."""
    if not dvc_lock.is_file():
        return None
    lock = yaml.safe_load(dvc_lock.read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for entry in stage.get("outs") or []:
            if entry.get("path") == out:
                return entry.get("md5") or entry.get("hash")
    return None


def dependency_md5(dvc_lock: Path, stage: str, dep: str) -> str | None:
    """The md5 dvc.lock records for dependency `dep` of `stage` (what its last run consumed), if any."""
    if not dvc_lock.is_file():
        return None
    lock = yaml.safe_load(dvc_lock.read_text()) or {}
    for entry in ((lock.get("stages") or {}).get(stage) or {}).get("deps") or []:
        if entry.get("path") == dep:
            return entry.get("md5")
    return None


def git_state(root: Path) -> dict[str, str | bool | None]:
    """The current commit and whether the working tree has uncommitted changes."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}

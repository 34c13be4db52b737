"""The Makefile takes the values a person or a workflow passes (FLOW_ARGS from a workflow_dispatch input, URL,
TAG...) as data: the recipe make would run is taken from `make -n` and run by bash with a stand-in
`python`, and no $(...), `...` or ; inside a value runs. Under CI=true a tool that cannot be installed
fails its target."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [shutil.which("make") or "make", "--no-print-directory", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def hostile(markers: Path) -> str:
    """A value with every way a shell or make could run code, each touching its own marker file."""
    return (
        f"--no-promote -S train.epochs=1 $(shell touch {markers}/make) $$(touch {markers}/dollar) "
        f"`touch {markers}/backtick`; touch {markers}/semicolon && touch {markers}/and "
        f"| touch {markers}/pipe *"
    )


def stub_python(folder: Path) -> Path:
    """A `python` that records its arguments, one per line, and runs nothing."""
    folder.mkdir()
    stub = folder / "python"
    stub.write_text('#!/usr/bin/env bash\nprintf \'%s\\n\' "$@" > "$ARGS_FILE"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return stub


@pytest.mark.parametrize("origin", ["command line", "environment"])
def test_flow_args_are_arguments_never_commands(tmp_path: Path, origin: str) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    value = hostile(markers)
    if origin == "command line":  # make flow FLOW_ARGS="--no-promote $FLOW_EXTRA_ARGS" (continuous-training)
        planned = make("-n", "flow", f"FLOW_ARGS={value}")
    else:
        planned = make("-n", "flow", env={"FLOW_ARGS": value})
    assert planned.returncode == 0, planned.stderr
    (recipe,) = [line for line in planned.stdout.splitlines() if "flows run" in line]
    stub_python(tmp_path / "bin")
    args_file = tmp_path / "args.txt"
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "ARGS_FILE": str(args_file),
    }
    ran = subprocess.run(
        ["bash", "-c", recipe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    assert sorted(p.name for p in markers.iterdir()) == [], "a FLOW_ARGS value ran as a command"
    args = args_file.read_text().splitlines()
    assert args[:5] == ["-m", "flows", "run", "--no-promote", "-S"]
    assert args[5:7] == ["train.epochs=1", "$(shell"] and args[-1] == "*", args  # unglobbed


def test_deploy_and_smoke_pass_their_values_as_single_words(tmp_path: Path) -> None:
    planned = make("-n", "deploy", "ENV=staging", f"TAG=abc$(touch {tmp_path}/m)")
    (line,) = [line for line in planned.stdout.splitlines() if "scripts/deploy.sh" in line]
    assert line.endswith(f"'staging' 'abc$(touch {tmp_path}/m)'"), line
    planned = make("-n", "smoke", f"URL=http://x/`touch {tmp_path}/m`", "SMOKE_ARGS=--images a;b")
    assert f"'http://x/`touch {tmp_path}/m`'" in planned.stdout and "args='--images a;b'" in planned.stdout
    assert not (tmp_path / "m").exists()


def test_under_ci_a_browser_that_cannot_be_installed_fails(tmp_path: Path) -> None:
    """No /usr/bin/chromium and no apt-get on PATH: outside CI a skip notice, under CI a failure."""
    if Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium exists here: the browser target has nothing to install")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "id", "env", "cat", "grep", "awk"):  # a PATH without apt-get
        found = subprocess.run(
            ["bash", "-c", f"command -v {tool}"], capture_output=True, text=True
        ).stdout.strip()
        if found:
            (bin_dir / tool).symlink_to(found)
    path = {"PATH": str(bin_dir)}
    outside = make("browser", env={**path, "CI": ""})
    assert outside.returncode == 0 and "skipped" in outside.stdout, outside.stdout + outside.stderr
    inside = make("browser", env={**path, "CI": "true"})
    assert inside.returncode != 0 and "CI=true" in inside.stderr, inside.stdout + inside.stderr


@pytest.mark.parametrize(("ci", "outcome"), [("", "1 skipped"), ("true", "1 failed")])
def test_a_missing_tool_skips_outside_ci_and_fails_under_ci(tmp_path: Path, ci: str, outcome: str) -> None:
    """tests/missing_tool.py: what the container, browser and kubectl tests call without their tool."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_needs_a_tool.py").write_text(
        "from missing_tool import missing_tool\n\n\ndef test_it():\n    missing_tool('no such tool here')\n"
    )
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT / "tests"), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in done.stdout and "no such tool here" in done.stdout, done.stdout + done.stderr

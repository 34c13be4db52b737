"""The flow's parts that need no Prefect API: overrides, failure classification, timeouts, alert routing."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import pytest

from catdog.errors import EXIT_FAILED, EXIT_GATE, EXIT_PERMANENT, EXIT_TRANSIENT, ConfigError
from flows import alerts, dvc_stages, overrides

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("test")


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def test_overrides_are_written_keeping_comments_and_order(params_file):
    before = params_file.read_text()
    changed = overrides.apply(
        params_file.parent, overrides.parse(["train.epochs_frozen=2", "train.augment.hflip=0.25", "seed=42"])
    )
    assert changed == {"train.epochs_frozen": (8, 2), "train.augment.hflip": (0.5, 0.25)}
    after = params_file.read_text()
    assert "epochs_frozen: 2" in after and "hflip: 0.25" in after
    assert after.count("#") == before.count("#"), "comments are kept"
    assert len(after.splitlines()) == len(before.splitlines())


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["train.epoch=2"], "has no key 'epoch' under train"),
        (["nothing.here=1"], "has no key 'nothing' under the top level"),
        (["train.epochs_frozen=-1"], "left unchanged: .*train.epochs_frozen"),
        (["export.quantization.per_channel=[1, 2"], "not valid YAML"),
        (["just-a-word"], "expected key.path=value"),
    ],
)
def test_bad_overrides_are_refused_and_params_yaml_is_left_as_it_was(params_file, pairs, message):
    before = params_file.read_text()
    with pytest.raises(ConfigError, match=message):
        overrides.apply(params_file.parent, overrides.parse(pairs))
    assert params_file.read_text() == before


@pytest.mark.parametrize(
    ("code", "retryable"),
    [(EXIT_TRANSIENT, True), (EXIT_FAILED, True), (-9, True), (EXIT_PERMANENT, False), (EXIT_GATE, False)],
)
def test_only_failures_that_may_be_transient_are_retried(code, retryable):
    failure = dvc_stages.StageFailed("ingest", code, ["Running stage 'ingest':", "error: boom"])
    assert failure.retryable is retryable
    assert "stage 'ingest' failed" in str(failure) and "error: boom" in str(failure)


def test_the_stage_commands_exit_status_is_read_from_dvcs_report():
    tail = ["ERROR: failed to reproduce 'evaluate': failed to run: python -m catdog evaluate, exited with 3"]
    assert dvc_stages.stage_exit_code(255, tail) == EXIT_GATE
    assert dvc_stages.stage_exit_code(255, ["ERROR: something else"]) == 255


def test_a_stage_dvc_finds_up_to_date_is_recognised_as_skipped():
    assert dvc_stages.skipped(
        "train", ["Stage 'train' didn't change, skipping", "Data and pipelines are up to date."]
    )
    assert not dvc_stages.skipped("train", ["Running stage 'train':", "> python -m catdog train"])


def test_a_stage_past_its_timeout_is_killed_and_counts_as_retryable(tmp_path):
    started = time.monotonic()
    command = [sys.executable, "-c", "import time; print('working', flush=True); time.sleep(60)"]
    with pytest.raises(dvc_stages.StageFailed) as failure:
        dvc_stages.run_command("train", command, tmp_path, dvc_stages.command_env(), 1.5, log)
    assert failure.value.timed_out and failure.value.retryable
    assert failure.value.tail == ["working"] and "timed out" in str(failure.value)
    assert time.monotonic() - started < 30


def test_a_commands_output_is_logged_line_by_line(tmp_path, caplog):
    command = [sys.executable, "-c", "import sys; print('one'); print('two', file=sys.stderr)"]
    with caplog.at_level(logging.INFO, logger="test"):
        tail = dvc_stages.run_command("prepare", command, tmp_path, dvc_stages.command_env(), 30, log)
    assert sorted(tail) == ["one", "two"]
    assert {"prepare | one", "prepare | two"} <= {r.getMessage() for r in caplog.records}


def test_no_alert_url_means_a_log_line_and_nothing_sent(monkeypatch, caplog):
    monkeypatch.delenv(alerts.ALERT_URLS_ENV, raising=False)
    with caplog.at_level(logging.INFO):
        assert alerts.send(title="t", body="b", failure=True, timeout_seconds=1, urls=[]) is False
    assert "no alert URL configured" in caplog.text


def test_alert_urls_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(alerts.ALERT_URLS_ENV, "https://discord.com/api/webhooks/1/a, slack://T1/B2/C3\n")
    assert alerts.configured_urls() == ["https://discord.com/api/webhooks/1/a", "slack://T1/B2/C3"]


def test_discord_slack_and_email_urls_become_apprise_plugins_and_relays_keep_their_host():
    bundle = alerts.notifier(
        [
            "https://discord.com/api/webhooks/123/tok-en",
            "http://relay.internal:8080/api/webhooks/123/tok-en",
            "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ",
            "mailto://user:pass@example.com",
            "not a url",
        ],
        timeout_seconds=3,
    )
    plugins = list(bundle)
    assert [type(p).__name__ for p in plugins] == [
        "NotifyDiscord",
        "NotifyDiscord",
        "NotifySlack",
        "NotifyEmail",
    ]
    assert plugins[0].notify_url == "https://discord.com/api/webhooks"
    assert plugins[1].notify_url == "http://relay.internal:8080/api/webhooks"
    assert alerts.redact("https://discord.com/api/webhooks/123/tok-en") == "https://discord.com/..."

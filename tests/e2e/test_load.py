"""A minute of mixed good and bad uploads at concurrency 32 against the real service (load_test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_process import Server

from benchmarks import load_test


@pytest.mark.slow
def test_a_minute_at_concurrency_32_of_good_and_bad_uploads(server: Server, sample_images_dir: Path) -> None:
    """No 5xx, no dropped connection, every upload gets its expected status and code, RSS grows < 10 %."""
    report = load_test.run(server.url, sample_images_dir, pid=server.process.pid, seconds=60, concurrency=32)
    result = report.result
    kinds = set(result.kinds)

    assert result.answered > 0
    assert result.server_errors == 0, result.statuses
    assert not result.errors, f"dropped connections: {dict(result.errors)}"
    assert not result.unexpected, f"unexpected answers: {dict(result.unexpected)}"
    assert {"good", "good_base64", *(request.kind for request in load_test.bad_requests(b""))} <= kinds
    assert report.rss_growth is not None
    assert report.rss_growth < load_test.MAX_RSS_GROWTH, report.summary()
    assert report.failures() == []

"""Alerts of the flow through Apprise (shipped with Prefect): Discord, Slack, e-mail and ~100 other services.

Where: $CATDOG_ALERT_URLS (Apprise URLs separated by spaces or commas; a Discord webhook URL as Discord gives
it works as is), else the Prefect Secret block named by $CATDOG_ALERT_SECRET_BLOCK (default
`catdog-alert-urls`) holding the same text. Nothing configured -> one log line, nothing sent. Sending runs
in a background thread with short socket timeouts and is abandoned after `timeout_seconds`: a slow or failing
webhook is logged and never fails nor holds the flow.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit

ALERT_URLS_ENV = "CATDOG_ALERT_URLS"
SECRET_BLOCK_ENV = "CATDOG_ALERT_SECRET_BLOCK"
DEFAULT_SECRET_BLOCK = "catdog-alert-urls"
DISCORD_HOSTS = frozenset({"discord.com", "discordapp.com", "www.discord.com"})
DISCORD_WEBHOOK = re.compile(
    r"^(?P<base>https?://[^/?#]+(?:/[^?#]*)?/api/webhooks)/(?P<id>[0-9]+)/(?P<token>[A-Za-z0-9_-]+)/?$"
)

logger = logging.getLogger(__name__)


def configured_urls() -> list[str]:
    """The alert URLs: $CATDOG_ALERT_URLS, else the Prefect Secret block, else none."""
    text = os.environ.get(ALERT_URLS_ENV, "").strip()
    if not text:
        text = _secret_block_text(os.environ.get(SECRET_BLOCK_ENV, "").strip() or DEFAULT_SECRET_BLOCK)
    return [url for url in re.split(r"[\s,]+", text) if url]


def _secret_block_text(name: str) -> str:
    """The value of a Prefect Secret block, or '' when there is none (or no API to ask)."""
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()
    except Exception as exc:  # no such block, or no API: alerts are optional
        logger.debug("no Prefect Secret block %r: %s", name, exc)
        return ""
    return value if isinstance(value, str) else " ".join(map(str, value or []))


def redact(url: str) -> str:
    """A URL fit for a log line: scheme and host only (webhook URLs carry their secret in the path)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/..."


def notifier(urls: Sequence[str], timeout_seconds: float):
    """An Apprise object for `urls`; a Discord webhook URL on another host (a relay, or the local stand-in of
    the tests) is sent by Apprise's Discord plugin to that host. Unusable URLs are logged and left out."""
    import apprise

    bundle = apprise.Apprise()
    for url in urls:
        webhook = DISCORD_WEBHOOK.match(url)
        relay = webhook and (urlsplit(url).hostname or "").lower() not in DISCORD_HOSTS
        plugin = apprise.Apprise.instantiate(
            f"discord://{webhook['id']}/{webhook['token']}" if relay else url, suppress_exceptions=True
        )
        if not plugin:
            logger.warning("alerts: %s is not a URL Apprise can send to; left out", redact(url))
            continue
        if relay:
            plugin.notify_url = webhook["base"]
        # Past timeout_seconds send() stops waiting; these only make the abandoned thread end soon after.
        plugin.socket_connect_timeout = timeout_seconds + 5
        plugin.socket_read_timeout = timeout_seconds + 5
        bundle.add(plugin)
    return bundle


def send(
    *,
    title: str,
    body: str,
    failure: bool,
    timeout_seconds: float,
    urls: Sequence[str] | None = None,
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> bool:
    """Send one alert to every configured URL; True when all accepted it. Never raises."""
    targets = list(urls) if urls is not None else configured_urls()
    if not targets:
        log.info(
            "alerts: no alert URL configured ($%s or a Secret block); not sending: %s", ALERT_URLS_ENV, title
        )
        return False
    outcome: dict[str, bool] = {}

    def deliver() -> None:
        try:
            import apprise

            bundle = notifier(targets, timeout_seconds)
            kind = apprise.NotifyType.FAILURE if failure else apprise.NotifyType.SUCCESS
            outcome["sent"] = bool(len(bundle)) and bool(
                bundle.notify(body=body, title=title, notify_type=kind)
            )
        except Exception as exc:  # an alert must never break the flow
            log.warning("alerts: sending failed: %s", exc)

    thread = threading.Thread(target=deliver, name="alert", daemon=True)
    thread.start()
    thread.join(timeout_seconds)
    where = ", ".join(redact(url) for url in targets)
    if thread.is_alive():
        log.warning("alerts: %s did not answer within %.0f s; going on without it", where, timeout_seconds)
        return False
    if outcome.get("sent"):
        log.info("alerts: sent to %s: %s", where, title)
        return True
    log.warning("alerts: %s did not accept the alert (see the log above): %s", where, title)
    return False

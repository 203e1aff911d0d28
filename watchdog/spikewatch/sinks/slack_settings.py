"""The ``[slack]`` settings of the service, and the secrets they name in the environment.

Secrets never come from the file: the file names environment variables, and the
variables are read (and checked) when the service starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spikewatch.errors import ConfigError, bad_value
from spikewatch.validation import check_float, check_int

_SECRET_KEYS = {"token", "bot_token", "webhook", "webhook_url"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class SlackSettings:
    """The ``[slack]`` section of the service configuration (secrets stay in the environment).

    Attributes:
        channel: where the bot posts (``#alerts`` or a channel ID); required with a bot token.
        bot_token_env: environment variable holding the bot token (``xoxb-...``).
        webhook_url_env: environment variable holding an incoming-webhook URL, used
            when there is no bot token (no threads, no charts).
        base_url: Web API base URL, for Enterprise Grid or a test server.
        timeout_s: seconds each HTTP request to Slack may take.
        max_retries: retries per call on rate limits, 5xx and connection errors.
        max_queue: events waiting for the worker; more are dropped and counted.
        max_retry_after_s: a 429 asking to wait longer than this is not slept on inside
            the call: the message waits in the outbox for as long as Slack asked.
        retry_backoff_s: first delay before a failed message is tried again (doubling).
        max_backoff_s: the longest delay between tries of a message; a longer outage
            is retried at this period until Slack takes the message.
        enabled: True when `from_mapping` found a token or webhook URL in the environment.

    Example:
        >>> SlackSettings.from_mapping({}, environ={}).enabled   # no [slack]: no Slack
        False
        >>> SlackSettings.from_mapping({"channel": "#alerts"}, environ={})
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: [slack] is set (channel='#alerts') but neither ...
        >>> SlackSettings.from_mapping({"chanel": "#alerts"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: unknown setting 'chanel' in [slack]: known settings are ...
    """

    channel: str | None = None
    bot_token_env: str = "SLACK_BOT_TOKEN"
    webhook_url_env: str = "SLACK_WEBHOOK_URL"
    base_url: str | None = None
    timeout_s: int = 10
    max_retries: int = 3
    max_queue: int = 1000
    max_retry_after_s: float = 60.0
    retry_backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    enabled: bool = False

    def __post_init__(self) -> None:
        for name in ("channel", "base_url"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise bad_value(f"slack.{name}", value, "use a non-empty string or leave it out")
        for name in ("bot_token_env", "webhook_url_env"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
                raise bad_value(f"slack.{name}", value, "name an environment variable")
        check_int("slack.timeout_s", self.timeout_s, minimum=1)
        check_int("slack.max_retries", self.max_retries, minimum=0)
        check_int("slack.max_queue", self.max_queue, minimum=1)
        check_float("slack.max_retry_after_s", self.max_retry_after_s, minimum=0.0)
        check_float("slack.retry_backoff_s", self.retry_backoff_s, minimum=0.0)
        check_float("slack.max_backoff_s", self.max_backoff_s, minimum=0.0)

    @classmethod
    def from_mapping(
        cls, data: dict[str, Any], *, environ: Mapping[str, str] = os.environ
    ) -> SlackSettings:
        """Build from the parsed ``[slack]`` table and check the secrets in ``environ``."""
        known = sorted(f.name for f in dataclasses.fields(cls) if f.name != "enabled")
        for key in data:
            if key in _SECRET_KEYS:
                raise ConfigError(
                    f"slack.{key} must not be in the config file: secrets come from the "
                    "environment; remove it and set $SLACK_BOT_TOKEN or $SLACK_WEBHOOK_URL "
                    "(or name other variables with bot_token_env / webhook_url_env)"
                )
            if key not in known:
                raise ConfigError(
                    f"unknown setting {key!r} in [slack]: known settings are " + ", ".join(known)
                )
        settings = cls(**data)
        token, webhook_url = read_secrets(settings, environ)
        if data and not (token or webhook_url):
            # A [slack] section says the team wants Slack: starting silently without it
            # would lose every incident message. Fail at start with the fix instead.
            raise ConfigError(
                f"[slack] is set (channel={settings.channel!r}) but neither "
                f"${settings.bot_token_env} nor ${settings.webhook_url_env} is: export one, "
                "or remove [slack] to run without Slack"
            )
        return dataclasses.replace(settings, enabled=bool(token or webhook_url))


def read_secrets(
    settings: SlackSettings, environ: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """(bot token, webhook URL) from the environment; fails fast on an unusable pair.

    Example:
        >>> read_secrets(SlackSettings(channel="#alerts"), {"SLACK_BOT_TOKEN": "xoxb-1"})
        ('xoxb-1', None)
        >>> read_secrets(SlackSettings(), {})
        (None, None)
    """
    token = environ.get(settings.bot_token_env, "").strip() or None
    webhook_url = environ.get(settings.webhook_url_env, "").strip() or None
    if token is not None and settings.channel is None:
        raise bad_value(
            "slack.channel",
            None,
            f'${settings.bot_token_env} holds a bot token, so set channel = "#alerts" '
            f"(a name or an ID) in [slack], or unset {settings.bot_token_env} to use the webhook",
        )
    if webhook_url is not None and not webhook_url.startswith(("https://", "http://")):
        raise ConfigError(
            f"${settings.webhook_url_env} is not a URL (value hidden): set it to the "
            "https://hooks.slack.com/services/... address of an incoming webhook"
        )
    return token, webhook_url

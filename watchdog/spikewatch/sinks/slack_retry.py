"""Bounded retries for slack_sdk clients: rate limits, server errors, lost connections.

slack_sdk retries only connection errors by default, and its rate-limit handler sleeps
whatever Retry-After says; a sink that must never stall caps that wait.
"""

from __future__ import annotations

import logging
import random

from slack_sdk import WebClient
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.jitter import Jitter
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.webhook import WebhookClient

logger = logging.getLogger(__name__)


class _ProportionalJitter(Jitter):
    """Up to +50% of the delay; slack_sdk's default jitter adds up to a whole second."""

    def recalculate(self, duration: float) -> float:
        return duration * (1.0 + 0.5 * random.random())


class BoundedRateLimitRetryHandler(RateLimitErrorRetryHandler):
    """Sleeps Slack's Retry-After like slack_sdk's, but gives up past ``max_wait_s``."""

    def __init__(self, *, max_retry_count: int, max_wait_s: float) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.max_wait_s = max_wait_s

    def _can_retry(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if response is None or response.status_code != 429:
            return False
        values = [v for k, v in response.headers.items() if k.lower() == "retry-after"]
        try:
            wait = int(values[0][0]) if values else 0  # the parent parses it the same way
        except ValueError:
            return False
        if wait > self.max_wait_s:
            logger.warning("slack asked to retry after %d s, over max_retry_after_s", wait)
            return False
        return True


def install_retry_handlers(
    target: WebClient | WebhookClient, *, retries: int, max_wait_s: float, backoff_s: float
) -> None:
    """Replace ``target``'s built-in retry handlers with bounded ones; keep any others.

    Rate limits wait for Retry-After (giving up past ``max_wait_s``); 500/503 and
    connection errors back off from ``backoff_s``, doubling; each at most ``retries`` times.

    Example:
        >>> client = WebClient(token="xoxb-example")
        >>> install_retry_handlers(client, retries=2, max_wait_s=30, backoff_s=0.5)
        >>> [(type(h).__name__, h.max_retry_count) for h in client.retry_handlers]
        ... # doctest: +NORMALIZE_WHITESPACE
        [('BoundedRateLimitRetryHandler', 2), ('ServerErrorRetryHandler', 2),
         ('ConnectionErrorRetryHandler', 2)]
    """
    backoff = BackoffRetryIntervalCalculator(backoff_factor=backoff_s, jitter=_ProportionalJitter())
    builtin = (ConnectionErrorRetryHandler, RateLimitErrorRetryHandler, ServerErrorRetryHandler)
    target.retry_handlers = [
        *(h for h in target.retry_handlers if not isinstance(h, builtin)),
        BoundedRateLimitRetryHandler(max_retry_count=retries, max_wait_s=max_wait_s),
        ServerErrorRetryHandler(max_retry_count=retries, interval_calculator=backoff),
        ConnectionErrorRetryHandler(max_retry_count=retries, interval_calculator=backoff),
    ]

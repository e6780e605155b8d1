"""How a send fails: whether another attempt may succeed, and after how long at the earliest."""

from __future__ import annotations


class DeliveryFailed(Exception):
    """A notification not delivered. ``retryable`` False: the same attempt would fail again (a
    refused address, a removed Slack hook); ``retry_after_s``: the receiver asked to wait."""

    def __init__(self, detail: str, *, retryable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.detail, self.retryable, self.retry_after_s = detail, retryable, retry_after_s

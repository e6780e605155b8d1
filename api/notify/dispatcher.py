"""The dispatcher: drains the registry's queue of delivery attempts.

Each round fails the attempts a dead dispatcher left ``sending`` past the lease, claims the due
``pending`` ones (``FOR UPDATE SKIP LOCKED``: replicas share the queue, never a row), sends them
a few at a time and records how each ended. A failure that may pass queues the next attempt
after an exponential backoff (``backoff_s * 2**(attempt-1)``, capped, at least what the
receiver's ``Retry-After`` asked); after ``max_attempts`` it stays failed. Everything lives in the
registry, so a restart resumes where the last process stopped: a send interrupted mid-way is
retried (a notification may then arrive twice, never zero times).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import httpx
import psycopg
import structlog
from psycopg_pool import ConnectionPool

from api.notify.errors import DeliveryFailed
from api.notify.http import check_destination, post_json, slack_body, teams_body, webhook_body
from api.notify.message import render
from api.notify.smtp import SmtpRelay, send_email
from registry import alerts

log = structlog.get_logger("api.notify")
Outcome = Literal["delivered", "failed", "canceled"]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_s: float = 30.0
    backoff_max_s: float = 3600.0

    def retry_at(self, attempt: int, now: datetime, asked_s: float | None = None) -> datetime | None:
        """When attempt ``attempt + 1`` is due, or None when ``attempt`` was the last."""
        if attempt >= self.max_attempts:
            return None
        wait = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return now + timedelta(seconds=max(wait, asked_s or 0.0))


class Senders:
    """Sends one message on its channel. ``smtp`` None: email is not configured (a final failure)."""

    def __init__(
        self,
        *,
        smtp: SmtpRelay | None,
        http: httpx.Client,
        allow_http: bool = False,
        allow_private: bool = False,
    ) -> None:
        self.smtp, self.http, self.allow_http, self.allow_private = smtp, http, allow_http, allow_private

    def send(self, due: alerts.DueDelivery) -> None:
        delivery, event, route = due.delivery, due.event, due.route
        assert route is not None
        message = render(event)
        if delivery.channel == "email":
            if self.smtp is None:
                raise DeliveryFailed("no SMTP relay is configured (IRONLINK_API_SMTP_HOST)", retryable=False)
            send_email(self.smtp, route.spec.recipients(), message)
            return
        address = check_destination(
            delivery.target, allow_http=self.allow_http, allow_private=self.allow_private
        )
        if delivery.channel == "slack":
            post_json(self.http, delivery.target, slack_body(message), address=address)
        elif delivery.channel == "teams":
            post_json(self.http, delivery.target, teams_body(message), address=address)
        else:
            secret = route.spec.authorization
            authorization = None if secret is None else secret.get_secret_value()
            body = webhook_body(event, message)
            post_json(self.http, delivery.target, body, authorization=authorization, address=address)


class Dispatcher:
    def __init__(
        self,
        pool: ConnectionPool,
        senders: Senders,
        policy: RetryPolicy,
        *,
        batch: int = 20,
        concurrency: int = 4,
        lease: timedelta = timedelta(minutes=5),
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.pool, self.senders, self.policy = pool, senders, policy
        self.batch, self.lease, self.clock = batch, lease, clock
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="notify")
        self._wake = threading.Event()

    def wake(self) -> None:
        """Start the next round now (new events were queued)."""
        self._wake.set()

    def run_once(self) -> int:
        """One round; how many attempts it finished."""
        now = self.clock()
        with self.pool.connection() as conn:
            alerts.reclaim_stale(
                conn, now=now, lease=self.lease, retry_at=lambda attempt: self.policy.retry_at(attempt, now)
            )
            due = alerts.claim_due(conn, now=now, limit=self.batch)
        return sum(self._executor.map(self._deliver, due))

    def _deliver(self, due: alerts.DueDelivery) -> int:
        delivery = due.delivery
        outcome: Outcome = "delivered"
        error: str | None = None
        retry_at: datetime | None = None
        if due.route is None or not due.route.spec.enabled:
            outcome, error = (
                "canceled",
                "the route was removed" if due.route is None else "the route is disabled",
            )
        else:
            try:
                self.senders.send(due)
            except DeliveryFailed as failure:
                outcome, error = "failed", failure.detail
                if failure.retryable:
                    retry_at = self.policy.retry_at(delivery.attempt, self.clock(), failure.retry_after_s)
            except Exception as unexpected:  # a defect must not strand the row in 'sending'
                outcome, error = "failed", f"{type(unexpected).__name__}: {unexpected}"
                retry_at = self.policy.retry_at(delivery.attempt, self.clock())
                log.exception("alert_delivery_defect", delivery_id=delivery.id)
        with self.pool.connection() as conn:
            alerts.finish_delivery(
                conn, delivery.id, status=outcome, now=self.clock(), error=error, retry_at=retry_at
            )
        log.info(
            "alert_delivery",
            delivery_id=delivery.id,
            event_id=delivery.event_id,
            tenant_id=delivery.tenant_id,
            channel=delivery.channel,
            attempt=delivery.attempt,
            outcome=outcome,
            error=error,
            next_retry_at=None if retry_at is None else retry_at.isoformat(),
        )
        return 1

    def run(self, stop: threading.Event, poll_s: float) -> None:
        """Rounds until ``stop``: after each, wait ``poll_s`` or until :meth:`wake`. A registry
        outage (or a defect) is logged and waited out: the queue is in the registry."""
        while not stop.is_set():
            try:
                finished = self.run_once()
            except (psycopg.Error, TimeoutError) as error:
                log.warning("alert_dispatch_failed", error=str(error))
                finished = 0
            except Exception:  # the loop outlives a defect; the rows wait in the registry
                log.exception("alert_dispatch_defect")
                finished = 0
            if finished < self.batch:
                self._wake.wait(poll_s)
                self._wake.clear()

    def close(self) -> None:
        self._executor.shutdown(wait=True)

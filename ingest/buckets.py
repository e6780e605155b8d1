"""Token buckets keyed by a string, in this process (a replica's share): the services' rate
limits (the API's points per key, the provisioning service's requests per source address and
claim token). Both images copy ``ingest/``.

Memory is bounded: at most ``max_keys`` buckets, the least recently used forgotten first (a
forgotten key starts again with a full bucket, which only ever admits a few more requests).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Bucket:
    tokens: float
    updated: float
    refusing: bool = False
    """Whether the last :meth:`KeyedBuckets.take` was refused."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float
    first_refusal: bool
    """True for the first refusal after an allowed request: worth one audit event, not every one."""


class KeyedBuckets:
    """``rate`` tokens a second refill each key's bucket, ``burst`` deep."""

    def __init__(
        self, rate: float, burst: int, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def _refilled(self, key: str) -> Bucket:
        """``key``'s bucket, refilled to now and made the most recently used (hold the lock)."""
        now = self.clock()
        bucket = self._buckets.pop(key, None) or Bucket(float(self.burst), now)
        self._buckets[key] = bucket
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        return bucket

    def take(self, key: str) -> Decision:
        """One token, or a refusal saying how long until there is one."""
        with self._lock:
            bucket = self._refilled(key)
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                bucket.refusing = False
                return Decision(True, 0.0, False)
            first = not bucket.refusing
            bucket.refusing = True
            return Decision(False, (1 - bucket.tokens) / self.rate, first)

"""One request governor for the whole fleet: a token bucket plus a global pause.

Celery's `rate_limit` is per worker; the Scenario plan's limits are per account. Every API
request first calls `acquire()`, and a 429 calls `penalize(retry_after)`, which pauses
every worker for the Retry-After and halves the rate (AIMD: additive recovery back to the
configured rate once the pause is over).

    LocalGovernor   in-process, thread-safe (embedded mode)
    RedisGovernor   shared by all workers through Redis; atomic Lua scripts timed by the
                    Redis server's clock; falls back to a local bucket while Redis is down
    NullGovernor    no limits (tests)
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from pipeline.errors import TransientError
from pipeline.retry import cap_retry_after

logger = logging.getLogger(__name__)

KEY_PREFIX = "pipeline:governor"
BUCKET_KEY = "{prefix}:bucket"  # hash: tokens, ts (µs), prate (penalized rate), pend (µs)
PAUSE_KEY = "{prefix}:pause"  # string with PX expiry: the fleet-wide pause

DEFAULT_PAUSE = 2.0  # seconds, when a 429 carries no Retry-After
RECOVERY = 0.05  # fraction of the configured rate regained per second after a penalty
MIN_RATE_FRACTION = 0.05  # penalties never slow the fleet below this share of the rate
REDIS_RETRY_INTERVAL = 5.0  # seconds on the local fallback before trying Redis again
REDIS_SOCKET_TIMEOUT = 1.0
BUCKET_TTL_MS = 3_600_000  # an idle fleet's bucket state expires after an hour
_EPSILON = 1e-9


class Governor(Protocol):
    """What the API client needs from a rate governor."""

    def acquire(self, timeout: float | None = None) -> None:
        """Block until a request may be sent; raise TransientError after `timeout` seconds."""

    def penalize(self, retry_after: float | None) -> None:
        """A 429 was seen: pause everyone for `retry_after` seconds and slow down."""


class NullGovernor:
    """No limits; counts calls so tests can assert on them."""

    def __init__(self) -> None:
        self.acquired = 0
        self.penalties: list[float | None] = []

    def acquire(self, timeout: float | None = None) -> None:
        """Return at once."""
        self.acquired += 1

    def penalize(self, retry_after: float | None) -> None:
        """Record the penalty and do nothing else."""
        self.penalties.append(retry_after)


def _pause_for(retry_after: float | None) -> float:
    capped = cap_retry_after(retry_after)
    return DEFAULT_PAUSE if capped is None or capped <= 0 else capped


def _check_limits(rate: float, burst: int) -> None:
    if rate <= 0:
        raise ValueError("governor rate must be > 0")
    if burst < 1:
        raise ValueError("governor burst must be >= 1")


class LocalGovernor:
    """A thread-safe in-process token bucket with a pause (embedded mode)."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        _check_limits(rate, burst)
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._stamp = clock()
        self._paused_until = 0.0
        self._penalized_rate: float | None = None
        self._penalty_end = 0.0

    def __repr__(self) -> str:
        return f"LocalGovernor(rate={self.rate}, burst={self.burst})"

    def current_rate(self) -> float:
        """The rate in force now: the configured one, or less while recovering from a 429."""
        with self._lock:
            return self._effective_rate(self._clock())

    def _effective_rate(self, now: float) -> float:
        if self._penalized_rate is None:
            return self.rate
        recovered = self._penalized_rate + self.rate * RECOVERY * max(0.0, now - self._penalty_end)
        if recovered >= self.rate:
            self._penalized_rate = None
            return self.rate
        return recovered

    def _try_take(self) -> float:
        """Take a token and return 0, or return the seconds to wait before trying again."""
        now = self._clock()
        if now < self._paused_until:
            return self._paused_until - now
        rate = self._effective_rate(now)
        # _stamp may lie in the future after a penalty: no refill during a pause.
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._stamp) * rate)
        self._stamp = max(self._stamp, now)
        # The epsilon absorbs float rounding that would otherwise ask for a 1e-17 s sleep.
        if self._tokens >= 1 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1)
            return 0.0
        return (1 - self._tokens) / rate

    def acquire(self, timeout: float | None = None) -> None:
        """Block until a token is free and no pause is in force."""
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            with self._lock:
                wait = self._try_take()
            if wait <= 0:
                return
            if deadline is not None:
                remaining = deadline - self._clock()
                if wait > remaining:
                    raise TransientError(
                        f"request governor: no slot within {timeout:.1f}s", retry_after=wait
                    )
            self._sleep(wait)

    def penalize(self, retry_after: float | None) -> None:
        """Pause for `retry_after` (or DEFAULT_PAUSE), empty the bucket, halve the rate."""
        pause = _pause_for(retry_after)
        with self._lock:
            now = self._clock()
            # Several requests of one burst get 429 together: halve once per episode.
            if now >= self._paused_until:
                floor = self.rate * MIN_RATE_FRACTION
                self._penalized_rate = max(floor, self._effective_rate(now) / 2)
            self._paused_until = max(self._paused_until, now + pause)
            self._penalty_end = self._paused_until
            self._tokens = 0.0
            self._stamp = self._paused_until
        logger.info("request governor paused %.2fs after a 429", pause)


# KEYS[1] bucket hash, KEYS[2] pause key.
# ARGV: rate, burst, recovery, bucket ttl ms.  Returns 0 (token taken) or ms to wait.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then return pause end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local recovery = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'prate', 'pend')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
local prate = tonumber(b[3])
local eff = rate
if prate then
  local since = (now - (tonumber(b[4]) or now)) / 1000000
  if since < 0 then since = 0 end
  eff = prate + rate * recovery * since
  if eff >= rate then
    eff = rate
    redis.call('HDEL', KEYS[1], 'prate', 'pend')
  end
end
local elapsed = (now - ts) / 1000000
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * eff)
if ts < now then ts = now end
local wait = 0
if tokens >= 0.999999 then
  tokens = math.max(0, tokens - 1)
else
  wait = math.ceil((1 - tokens) / eff * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return wait
"""

# KEYS[1] bucket hash, KEYS[2] pause key.
# ARGV: pause ms, rate, recovery, min rate fraction, bucket ttl ms.  Returns the pause in ms.
_PENALIZE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause_ms = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local recovery = tonumber(ARGV[3])
local floor = rate * tonumber(ARGV[4])
local current = redis.call('PTTL', KEYS[2])
local b = redis.call('HMGET', KEYS[1], 'prate', 'pend')
if current <= 0 then
  local eff = rate
  local prate = tonumber(b[1])
  if prate then
    local since = (now - (tonumber(b[2]) or now)) / 1000000
    if since < 0 then since = 0 end
    eff = math.min(rate, prate + rate * recovery * since)
  end
  redis.call('HSET', KEYS[1], 'prate', tostring(math.max(floor, eff / 2)))
end
if pause_ms > current then
  redis.call('SET', KEYS[2], '1', 'PX', pause_ms)
  current = pause_ms
end
local pend = now + current * 1000
redis.call('HSET', KEYS[1], 'tokens', '0', 'ts', tostring(pend), 'pend', tostring(pend))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
return current
"""


class RedisGovernor:
    """A token bucket and pause shared by every worker through Redis.

    Connections are built lazily and rebuilt after a fork. While Redis is unreachable the
    governor logs one warning and limits locally (at `fallback_rate`, default `rate`: each
    worker then allows the whole rate, so the fleet may overshoot until Redis returns and
    429s are handled by penalize); it tries Redis again every REDIS_RETRY_INTERVAL seconds.
    """

    def __init__(
        self,
        redis_url: str,
        rate: float,
        burst: int,
        key_prefix: str = KEY_PREFIX,
        *,
        fallback_rate: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        _check_limits(rate, burst)
        self.rate = float(rate)
        self.burst = int(burst)
        self.key_prefix = key_prefix
        self._url = redis_url
        self._sleep = sleep
        self._keys = [BUCKET_KEY.format(prefix=key_prefix), PAUSE_KEY.format(prefix=key_prefix)]
        self._fallback = LocalGovernor(fallback_rate or rate, burst, sleep=sleep)
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._redis: Any = None
        self._acquire_script: Any = None
        self._penalize_script: Any = None
        self._down_until = 0.0
        self._warned = False

    def __repr__(self) -> str:
        # The URL may carry a password: show only the key prefix.
        return f"RedisGovernor(prefix={self.key_prefix!r}, rate={self.rate}, burst={self.burst})"

    def _client(self) -> Any:
        """The Redis client of this process, built on first use and after a fork."""
        with self._lock:
            if self._redis is None or self._pid != os.getpid():
                import redis  # imported lazily: embedded mode never needs it

                self._redis = redis.Redis.from_url(
                    self._url,
                    socket_timeout=REDIS_SOCKET_TIMEOUT,
                    socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
                )
                # register_script reloads the script by itself after a Redis restart.
                self._acquire_script = self._redis.register_script(_ACQUIRE_LUA)
                self._penalize_script = self._redis.register_script(_PENALIZE_LUA)
                self._pid = os.getpid()
            return self._redis

    def _redis_usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _mark_down(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + REDIS_RETRY_INTERVAL
        if not self._warned:
            self._warned = True
            logger.warning(
                "request governor: Redis unreachable (%s); limiting locally until it returns",
                type(exc).__name__,
            )

    def _mark_up(self) -> None:
        if self._warned:
            self._warned = False
            logger.info("request governor: Redis reachable again; fleet-wide limits restored")

    def _try_take(self) -> float | None:
        """Seconds to wait (0 when a token was taken), or None when Redis is down."""
        if not self._redis_usable():
            return None
        import redis

        try:
            self._client()
            wait_ms = self._acquire_script(
                keys=self._keys, args=[self.rate, self.burst, RECOVERY, BUCKET_TTL_MS]
            )
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            return None
        self._mark_up()
        return int(wait_ms) / 1000.0

    def acquire(self, timeout: float | None = None) -> None:
        """Block until the shared bucket gives a token and no fleet-wide pause is in force."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = self._try_take()
            if wait is None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                # Bounded so that a recovered Redis takes over again soon.
                self._fallback.acquire(timeout=remaining)
                return
            if wait <= 0:
                return
            if deadline is not None and wait > deadline - time.monotonic():
                raise TransientError(
                    f"request governor: no slot within {timeout:.1f}s", retry_after=wait
                )
            # A little jitter so workers woken by the same refill do not collide.
            self._sleep(wait * (1 + random.uniform(0, 0.1)))

    def penalize(self, retry_after: float | None) -> None:
        """Pause the whole fleet and halve the shared rate; local-only while Redis is down."""
        pause = _pause_for(retry_after)
        if self._redis_usable():
            import redis

            try:
                self._client()
                self._penalize_script(
                    keys=self._keys,
                    args=[
                        int(pause * 1000),
                        self.rate,
                        RECOVERY,
                        MIN_RATE_FRACTION,
                        BUCKET_TTL_MS,
                    ],
                )
                self._mark_up()
                logger.info("request governor: fleet paused %.2fs after a 429", pause)
                return
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._mark_down(exc)
        self._fallback.penalize(retry_after)

    def close(self) -> None:
        """Drop this process's Redis connections."""
        with self._lock:
            if self._redis is not None and self._pid == os.getpid():
                self._redis.close()
            self._redis = None
            self._pid = None


def make_governor(redis_url: str | None, rate: float, burst: int) -> Governor:
    """A RedisGovernor for a redis:// URL (distributed), else a LocalGovernor (embedded)."""
    if redis_url and redis_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisGovernor(redis_url, rate, burst)
    return LocalGovernor(rate, burst)

"""How a cache in a bucket rides out an object store that misbehaves: the retry policy, stated once.

Real S3 services throttle (``503 SlowDown``), fail (``500``), drop connections during an
upload or a range read, hang, and cut answers short. Every request the cache makes to a
bucket (cache/objects.py) goes through :meth:`RetryPolicy.run`:

- **Which failures are retried**: an answer with a 5xx status, ``408`` or ``429``; a
  connection refused, reset or closed before the whole answer came; a request with no
  whole answer within ``timeout_s``; a range answered with fewer bytes than asked. Never:
  a missing object, a failed condition (``412``: another writer's object), a refused
  credential or any other 4xx: those are answers, not failures.
- **How many times**: ``retries`` (default 10) retries after the first try, and none that
  would start later than ``give_up_s`` (default 180 s) after it.
- **Backoff**: the n-th retry waits ``backoff_s * 2**n`` (0.1 s, 0.2 s, 0.4 s, ...), capped
  at ``backoff_max_s`` (15 s), each drawn between half of that and all of it (jitter), so
  writers throttled together do not come back together. ``Retry-After`` is not read (the
  client does not expose it): the backoff spaces the retries.
- **Timeouts**: ``connect_timeout_s`` (5 s) for a connection, ``timeout_s`` (30 s) for a
  whole request, body included: raise it where a shard's upload (``--shard-mb``, 64 MB by
  default) takes longer on your link.
- **A conditional put whose outcome is unknown** (its answer was lost: a reset or a
  timeout after the request went out) is never simply sent again: the object is read back
  first. Holding our bytes, the put landed (it succeeded, once); absent (create) or still at
  the ETag we replace (swap), it is put again; anything else is another writer's (the
  condition failed). So a lost commit answer never makes a second commit nor a missing one.
- **Giving up** raises :class:`BucketUnavailable`: one message naming the request, the
  tries and the last failure; nothing half-written reads as valid, and the same command
  run again resumes.

The S3 client's own retries are switched off (:meth:`RetryPolicy.client_retry`): every
retry is made here, by this one policy. Settings: :data:`SETTINGS` (environment
variables; ``$AWS_MAX_ATTEMPTS``, the AWS SDKs' count of tries, sets ``retries`` when
``$PIPE_S3_RETRIES`` is unset). ``pipe doctor`` prints the policy in force.
"""
from __future__ import annotations

import math
import os
import random
import re
import time
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Callable, TypeVar

from core.errors import PipeError

T = TypeVar("T")
_STATUS = re.compile(r"status code: (\d{3})")
_RETRIED_4XX = {408, 429}  # request timeout, too many requests: failures of the moment, not answers
_JITTER = random.Random()


class BucketUnavailable(PipeError):
    """A request to the bucket failed every try the retry policy allows; the message says what to do."""


class ShortRead(Exception):
    """An answer with fewer bytes than its own length, or than the range asked: tried again."""


@dataclass(frozen=True)
class Setting:
    """One setting of the policy: its field, its environment variable, and what it means."""

    field: str
    env: str
    help: str
    integer: bool = False


SETTINGS = (
    Setting("retries", "PIPE_S3_RETRIES", "retries of one request after a failure that may pass", integer=True),
    Setting("backoff_s", "PIPE_S3_BACKOFF_S", "the wait before the first retry, in seconds; doubles each retry"),
    Setting("backoff_max_s", "PIPE_S3_BACKOFF_MAX_S", "the longest wait between two tries, in seconds"),
    Setting("give_up_s", "PIPE_S3_GIVE_UP_S", "no retry starts later than this after the first try, in seconds"),
    Setting("timeout_s", "PIPE_S3_TIMEOUT_S", "a request without its whole answer by then is abandoned, in seconds"),
    Setting("connect_timeout_s", "PIPE_S3_CONNECT_TIMEOUT_S", "the time a connection may take, in seconds"),
)
ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"  # the AWS SDKs' setting: tries in all, the first included


@dataclass(frozen=True)
class RetryPolicy:
    """What is retried, how often and how far apart (see the module); :meth:`from_env` reads the settings."""

    retries: int = 10
    backoff_s: float = 0.1
    backoff_max_s: float = 15.0
    give_up_s: float = 180.0
    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, env: dict | None = None) -> "RetryPolicy":
        """The defaults, with each setting whose environment variable is set (one message per bad value)."""
        env = os.environ if env is None else env
        policy, bad = cls(), []
        attempts = env.get(ATTEMPTS_ENV, "").strip()
        if attempts and not env.get("PIPE_S3_RETRIES", "").strip():
            value = _number(attempts, integer=True)
            if value is None or value < 1:
                bad.append(f"${ATTEMPTS_ENV}={attempts!r} (tries in all: a whole number, at least 1)")
            else:
                policy = replace(policy, retries=int(value) - 1)
        for s in SETTINGS:
            raw = env.get(s.env, "").strip()
            if not raw:
                continue
            value = _number(raw, s.integer)
            if value is None or value < 0 or (value == 0 and s.field.endswith("timeout_s")):
                bad.append(f"${s.env}={raw!r} ({s.help}: a {'whole ' if s.integer else ''}number"
                           f"{', above 0' if s.field.endswith('timeout_s') else ', 0 or more'})")
            else:
                policy = replace(policy, **{s.field: value})
        if bad:
            raise PipeError("bad object-store retry settings: " + "; ".join(bad) + ". Fix or unset them; the "
                            f"defaults are {cls().describe()}.")
        return policy

    def describe(self) -> str:
        """The policy in one line (for `pipe doctor`, logs and messages)."""
        return (f"{self.retries} retries of 5xx/408/429 answers, resets, timeouts and short reads; backoff "
                f"{_s(self.backoff_s)} doubling to at most {_s(self.backoff_max_s)} (jittered), none after "
                f"{_s(self.give_up_s)}; timeouts {_s(self.connect_timeout_s)} to connect, {_s(self.timeout_s)} "
                "a request; a conditional put whose answer was lost is read back before it is sent again")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- the S3 client -----------------------------------------------------------------------
    def client_options(self) -> dict:
        """The client's timeouts (obstore's ``ClientConfig``)."""
        return {"timeout": timedelta(seconds=self.timeout_s), "connect_timeout": timedelta(seconds=self.connect_timeout_s)}

    @staticmethod
    def client_retry() -> dict:
        """The client's own retries (obstore's ``RetryConfig``): none, every retry is :meth:`run`'s."""
        return {"max_retries": 0, "retry_timeout": timedelta(seconds=1)}

    # -- retrying ------------------------------------------------------------------------------
    def wait(self, retry: int, rng: random.Random | None = None) -> float:
        """How long to wait before retry number ``retry`` (0 for the first)."""
        top = min(self.backoff_max_s, self.backoff_s * 2.0 ** min(retry, 60))
        return top * (rng or _JITTER).uniform(0.5, 1.0)

    def run(self, call: Callable[[], T], what: str, on_retry: Callable[[Exception], None] | None = None) -> T:
        """``call()``, tried again after each failure that may pass, as the policy says; ``what``
        names the request in the message of :class:`BucketUnavailable` when every try failed.
        ``on_retry`` runs before each retry (it may itself raise, or return to let it happen)."""
        t0 = time.monotonic()
        for retry in range(self.retries + 1):
            try:
                return call()
            except Exception as e:  # noqa: BLE001 - sorted by transient(); anything else is raised as it is
                if not transient(e):
                    raise
                pause = self.wait(retry)
                if retry >= self.retries or time.monotonic() - t0 + pause > self.give_up_s:
                    raise self.gave_up(what, retry + 1, time.monotonic() - t0, e) from None
                time.sleep(pause)
                if on_retry is not None:
                    on_retry(e)
        raise AssertionError("unreachable")  # pragma: no cover

    def gave_up(self, what: str, tries: int, elapsed: float, error: Exception) -> BucketUnavailable:
        return BucketUnavailable(
            f"{what}: the bucket failed {tries} tr{'y' if tries == 1 else 'ies'} over {elapsed:.1f} s (last: "
            f"{reason(error)}). It is throttling, failing or unreachable. Nothing half-written reads as valid: run "
            "the same command again once it answers, and it resumes where this one stopped (committed work is "
            f"kept). Retries: {self.retries} ($PIPE_S3_RETRIES), for at most {_s(self.give_up_s)} "
            "($PIPE_S3_GIVE_UP_S); `pipe doctor` prints the whole policy.")


def transient(e: BaseException) -> bool:
    """A failure that may pass: 5xx, 408, 429, or no whole answer (connection, timeout, body cut short)."""
    from obstore.exceptions import GenericError  # lazy: only object-store caches need the client

    if isinstance(e, ShortRead):
        return True
    if not isinstance(e, GenericError):
        return False
    m = _STATUS.search(str(e).split("\n", 1)[0])
    return m is None or int(m[1]) >= 500 or int(m[1]) in _RETRIED_4XX


def reason(e: BaseException) -> str:
    """The client's error in a few words: the status it answered, or the transport failure."""
    first = str(e).split("\n", 1)[0]
    m = _STATUS.search(first)
    if m:
        code = re.search(r"<Code>([^<]+)</Code>", str(e))
        return f"{m[1]}{' ' + code[1] if code else ''}"
    return re.sub(r"^.*? - ", "", first)[:160] or type(e).__name__


def _number(raw: str, integer: bool) -> float | None:
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _s(seconds: float) -> str:
    return f"{seconds:g} s"

"""The one backoff policy for reaching a broker or a hypervisor again."""

from __future__ import annotations

import logging
import random
import threading

import tenacity

INITIAL_S = 0.5
MAX_S = 30.0
JITTER_S = 1.0


def backoff_s(retries: int) -> float:
    """The wait before the next try after `retries` failed ones: exponential, with jitter,
    at most MAX_S. For waits no exception drives (a broker's nack)."""
    return min(INITIAL_S * 2.0**retries + random.uniform(0, JITTER_S), MAX_S)


def until_stopped(
    retry_on: type[BaseException], stop: threading.Event, what: str, log: logging.Logger
) -> tenacity.Retrying:
    """Retries `retry_on` with exponential backoff and jitter until it succeeds or `stop` is set.

    Other exceptions propagate at once: whether an error is worth retrying is
    decided by its class. A stop during a wait ends it early and re-raises the
    last error. Each wait is announced with one log line naming `what`.
    """

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    def announce(state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        reason = " ".join(str(err).split()) if err is not None else "unknown error"
        log.warning("%s unreachable: %s; retrying in %.1f s", what, reason, delay)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(retry_on),
        wait=lambda state: backoff_s(state.attempt_number - 1),
        stop=tenacity.stop_when_event_set(stop),
        sleep=sleep,
        before_sleep=announce,
        reraise=True,
    )

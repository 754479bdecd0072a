"""The daemon's clocks, handed in so a test can drive time instead of waiting for it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clock:
    wall: Callable[[], float] = time.time
    """Stamps messages and ages what waits (the grace of a domain found gone, drop reports)."""
    monotonic: Callable[[], float] = time.monotonic
    """Paces the polling of backends."""

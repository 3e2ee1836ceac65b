"""How long an idle engine waits for the rest of a burst before it starts work.

Requests sent at once (several users after a barrier, a client's concurrent calls) reach the engine spread over
milliseconds: each HTTP request is parsed in turn, and once work runs, the engine thread competes with the
server's for the GIL, which spreads the later arrivals further. Started on the first arrival, the rest would
run a step or a pass later: a training burst as two packed passes instead of one (the seed loop on the CPU), a
diffusion burst with its rows in different phases of their blocks and a second forward on most steps. So an
idle engine waits while arrivals keep coming, a few milliseconds at a time, with a bound.
"""

from __future__ import annotations

QUIET_SECONDS = 0.003  # no arrival for this long: the burst is over
MAX_SECONDS = 0.05  # never wait longer than this after the burst's first request


def wait_left(now: float, first: float, last: float) -> float:
    """Seconds still to wait for a burst whose first request arrived at `first` and latest at `last` (all
    `time.monotonic()`); <= 0: start now."""
    return min(QUIET_SECONDS - (now - last), MAX_SECONDS - (now - first))

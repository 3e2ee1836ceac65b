"""The supervisor's restart policy, without processes (tests/e2e/test_router_restart.py restarts a real one)."""

from __future__ import annotations

import pytest

from tinkerbell.config import ConfigError
from tinkerbell.router.supervisor import RESTARTS_ENV, max_restarts, restart_delay


def test_restart_backoff_doubles_from_one_second_up_to_thirty():
    assert [restart_delay(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [1, 2, 4, 8, 16, 30, 30]


def test_restart_count_comes_from_the_environment():
    assert max_restarts({}) == 5
    assert max_restarts({RESTARTS_ENV: "0"}) == 0
    assert max_restarts({RESTARTS_ENV: " 12 "}) == 12


@pytest.mark.parametrize("bad", ["-1", "many", "1.5"])
def test_bad_restart_count_names_the_variable(bad):
    with pytest.raises(ConfigError, match=RESTARTS_ENV):
        max_restarts({RESTARTS_ENV: bad})

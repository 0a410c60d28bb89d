"""The failed-login table on its own, with a clock the test moves."""

from __future__ import annotations

from minicpmv_demo.web.login_throttle import LoginThrottle


def test_cools_down_and_stays_bounded():
    now = [0.0]
    throttle = LoginThrottle(limit=3, window_s=60, max_clients=100, clock=lambda: now[0])
    for second in (0, 10, 20):
        now[0] = second
        assert throttle.retry_after("a") == 0
        throttle.failed("a")
    assert throttle.retry_after("a") == 40 and throttle.retry_after("b") == 0
    now[0] = 59.5
    assert throttle.retry_after("a") == 1
    now[0] = 60
    assert throttle.retry_after("a") == 0, "the first failure left the window"
    throttle.failed("a")
    assert throttle.retry_after("a") == 10, "the next one waits for the second failure to leave"
    throttle.succeeded("a")
    assert throttle.retry_after("a") == 0
    for client in range(1000):
        throttle.failed(str(client))
    assert len(throttle) == 100
    now[0] = 1000
    throttle.failed("late")
    assert len(throttle) == 1, "clients whose failures left the window are forgotten"

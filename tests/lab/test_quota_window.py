"""The rate budget's sliding window (``gateway.admission.Quota``) under the corrections a
quota run makes: a booking corrected after it left the window, a refused one dropped."""

from __future__ import annotations

from gateway.admission import Quota


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_booking_corrected_after_it_left_the_window_changes_nothing() -> None:
    """A request that runs longer than the window is corrected once its booking has left it
    (no check pruned the window in between): the window must not count it, now or later."""
    clock = Clock()
    q = Quota(1000, None, 10.0, clock)
    entry = q.book(300)
    clock.t = 10.5  # the booking left the window; nothing has looked at the window since
    q.correct(entry, 500)  # the request ends: it really cost 500
    later = q.book(100)
    assert q.fits(900) and not q.fits(901)  # the window holds the later 100 only
    assert q.used == 100 and q.requests == 1
    clock.t = 21.0
    assert q.fits(0) and q.used == 0 and q.requests == 0
    assert later.tokens == 100


def test_corrections_inside_the_window_follow_the_real_count() -> None:
    clock = Clock()
    q = Quota(1000, None, 10.0, clock)
    a = q.book(300)
    clock.t = 2.0
    b = q.book(200)
    q.correct(a, 450)  # outran its prediction
    q.correct(b, 50)  # ended early
    assert q.used == 500 and q.fits(500) and not q.fits(501)
    q.drop(b)  # refused after all: counts nothing
    assert q.used == 450 and q.requests == 1
    clock.t = 10.0  # a leaves (a window is (now - 10, now])
    assert q.fits(1000) and q.used == 0

"""The pure sliding-window RPM/TPM limiter with a fake clock (times passed in)."""

from __future__ import annotations

import pytest

from backends.sim.ratelimit import RateLimiter, RateLimits, format_duration


def limiter(tpm: int | None = None, rpm: int | None = None, window: float = 10.0) -> RateLimiter:
    return RateLimiter(RateLimits(tpm=tpm, rpm=rpm, window_s=window))


def test_rpm_refuses_the_extra_request_until_the_oldest_leaves() -> None:
    rl = limiter(rpm=3)
    for t in (0.0, 1.0, 2.0):
        assert rl.admit(t, 5).accepted
    d = rl.admit(2.5, 5)
    assert not d.accepted and d.reason == "requests"
    assert d.retry_after == 7.5  # the request at 0.0 leaves at 10.0
    assert (d.used_requests, d.used_tokens) == (3, 15)
    assert not rl.admit(9.75, 5).accepted
    d = rl.admit(10.0, 5)
    assert d.accepted and d.retry_after == 0.0
    assert rl.usage(10.0) == (3, 15)  # 1.0, 2.0, 10.0; refusals are not counted


def test_tpm_counts_prompt_plus_output_and_waits_for_enough_to_leave() -> None:
    rl = limiter(tpm=100)
    assert rl.admit(0.0, 40).accepted
    assert rl.admit(1.0, 30).accepted
    assert rl.admit(2.0, 30).accepted  # exactly the limit fits
    d = rl.admit(3.0, 50)
    assert not d.accepted and d.reason == "tokens"
    # 50 must free: the 40 at 0.0 is not enough, the 30 at 1.0 too -> 11.0
    assert d.retry_after == 8.0
    assert not rl.admit(10.5, 50).accepted  # only 40 left the window
    assert rl.admit(11.0, 50).accepted
    assert rl.usage(11.0) == (2, 80)


@pytest.mark.parametrize("cost", [1, 25, 60, 99])
def test_retry_after_is_exact(cost: int) -> None:
    rl = limiter(tpm=100, rpm=10, window=8.0)
    for i, c in enumerate((20, 30, 25, 25)):
        assert rl.admit(i * 0.5, c).accepted  # 100 tokens at 0, 0.5, 1, 1.5
    d = rl.admit(2.25, cost)
    assert not d.accepted
    probe = RateLimiter(rl.limits)
    for i, c in enumerate((20, 30, 25, 25)):
        probe.admit(i * 0.5, c)
    assert not probe.admit(2.25 + d.retry_after - 2**-20, cost).accepted
    assert probe.admit(2.25 + d.retry_after, cost).accepted


def test_oversized_request_only_into_an_empty_window() -> None:
    rl = limiter(tpm=100)
    assert rl.admit(0.0, 10).accepted
    d = rl.admit(1.0, 250)
    assert not d.accepted and d.reason == "tokens"
    assert d.retry_after == 9.0  # the whole window must empty
    big = rl.admit(10.0, 250)
    assert big.accepted and big.quota.remaining_tokens == 0
    d = rl.admit(12.0, 1)
    assert not d.accepted and d.retry_after == 8.0
    assert rl.admit(20.0, 1).accepted


def test_the_longer_wait_names_the_reason() -> None:
    rl = limiter(tpm=100, rpm=2)
    assert rl.admit(0.0, 90).accepted
    assert rl.admit(4.0, 5).accepted
    d = rl.admit(5.0, 10)  # rpm frees at 10.0, tokens at 10.0 too: a tie says requests
    assert (d.reason, d.retry_after) == ("requests", 5.0)
    d = rl.admit(5.0, 96)  # tokens need both gone (14.0), requests only the first
    assert (d.reason, d.retry_after) == ("tokens", 9.0)
    assert rl.refused == {"requests": 1, "tokens": 1}
    assert rl.refused_tokens == 106
    assert (rl.accepted_requests, rl.accepted_tokens) == (2, 95)


def test_headers_of_accepted_and_refused_requests() -> None:
    rl = limiter(tpm=1000, rpm=3, window=60.0)
    assert rl.quota(0.0).headers() == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "1000",
        "x-ratelimit-reset-tokens": "0s",
    }
    rl.admit(0.0, 100)
    d = rl.admit(30.5, 250)  # remaining counts this request
    assert d.headers() == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "650",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    rl.admit(31.0, 100)
    d = rl.admit(32.0, 10)
    assert not d.accepted
    headers = d.headers()
    assert headers["retry-after"] == "28" and headers["retry-after-ms"] == "28000"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "59s"  # 31.0 + 60 - 32.0
    d = rl.admit(59.75, 10)
    assert d.headers()["retry-after"] == "1" and d.headers()["retry-after-ms"] == "250"


def test_only_the_limited_dimension_has_headers() -> None:
    assert set(limiter(rpm=5).quota(0.0).headers()) == {
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    }
    rl = limiter(tpm=5)
    assert rl.admit(0.0, 5).accepted and rl.admit(0.0, 0).accepted  # rpm unlimited
    assert rl.quota(0.0).remaining_requests is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.0001, "1ms"),
        (0.12, "120ms"),
        (0.999, "999ms"),
        (1.0, "1s"),
        (8.64, "8.64s"),
        (59.5, "59.5s"),
        (60.0, "1m0s"),
        (86.4, "1m26.4s"),
        (360.0, "6m0s"),
        (3600.0, "1h0m0s"),
        (3723.25, "1h2m3.25s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_clock_going_back_stands_still_and_limits_validate() -> None:
    rl = limiter(rpm=1)
    assert rl.admit(5.0, 1).accepted
    d = rl.admit(4.0, 1)  # treated as 5.0
    assert not d.accepted and d.retry_after == 10.0
    with pytest.raises(ValueError, match="tpm"):
        RateLimits(tpm=0)
    with pytest.raises(ValueError, match="window"):
        RateLimits(rpm=1, window_s=0)
    assert not RateLimits().enabled and RateLimits(rpm=1).enabled

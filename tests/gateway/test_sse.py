"""Splitting a streamed body into SSE data payloads, however the reads cut it."""

from __future__ import annotations

import random

import pytest

from gateway.upstream.sse import SseSplitter

EVENTS = [b'{"a":1}', b'{"b":"x y"}', b'  {"c":3}  ', b'{"d":[]}']
BODY = (
    b"data: " + EVENTS[0] + b"\n\n"
    b": ping\n\n"
    b"data:" + EVENTS[1] + b"\r\n\r\n"
    b"event: x\ndata: " + EVENTS[2] + b"\n\n"
    b"data: " + EVENTS[3] + b"\n\n"
    b"data: [DONE]\n\n"
    b'data: {"after":1}\n\n'
)


def _split(reads: list[bytes]) -> tuple[list[list[bytes]], bool]:
    s = SseSplitter()
    batches = []
    for r in reads:
        batch = s.feed(r)
        if batch:
            batches.append(batch)
        if s.done:
            break
    return batches, s.done


@pytest.mark.parametrize("seed", range(40))
def test_any_cut_of_the_reads_yields_the_same_payloads(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(BODY)), rng.randint(0, 12)))
    reads = [BODY[a:b] for a, b in zip([0, *cuts], [*cuts, len(BODY)], strict=True)]
    batches, done = _split(reads)
    assert done
    assert [p for b in batches for p in b] == [e.strip() for e in EVENTS]


def test_one_event_per_read_is_one_batch_each_and_done_ends_it() -> None:
    reads = [b"data: " + e + b"\n\n" for e in EVENTS] + [b"data: [DONE]\n\n", b"data: {}\n\n"]
    batches, done = _split(reads)
    assert done and batches == [[e.strip()] for e in EVENTS]


def test_a_read_with_several_events_is_one_batch() -> None:
    batches, done = _split([b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\ndata: 3\n\n"])
    assert done and batches == [[b"1", b"2"]]

"""Admission control: both limits, least-loaded placement, health, exclusion, release."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from gateway.admission import AdmissionController, BackendSlots, Reservation


def backend(
    name: str,
    seqs: int = 4,
    kv: int = 1000,
    models: tuple[str, ...] = ("m",),
    healthy: bool = True,
) -> BackendSlots:
    return BackendSlots(
        name, frozenset(models), max_num_seqs=seqs, max_kv_tokens=kv, healthy=healthy
    )


def state(b: BackendSlots) -> tuple[int, int]:
    return b.in_flight, b.reserved_tokens


def placed(
    ac: AdmissionController, model: str, tokens: int, exclude: Iterable[str] = ()
) -> str | None:
    b = ac.place(model, tokens, exclude)
    return None if b is None else b.name


# -- limits --------------------------------------------------------------------------------------


def test_fits_needs_a_free_sequence_slot() -> None:
    ac = AdmissionController([backend("b", seqs=2, kv=10_000)])
    b = ac.get("b")
    for _ in range(2):
        placed = ac.place("m", 10)
        assert placed is b
        ac.reserve(placed, 10)
    assert not b.fits(1)
    assert ac.place("m", 1) is None  # tokens to spare, but no sequence slot
    assert b.load == 1.0


def test_fits_needs_kv_tokens_and_the_limit_is_inclusive() -> None:
    ac = AdmissionController([backend("b", seqs=100, kv=100)])
    b = ac.get("b")
    ac.reserve(b, 60)
    assert b.fits(40)  # exactly full is allowed
    assert not b.fits(41)
    assert ac.place("m", 41) is None
    assert ac.place("m", 40) is b
    ac.reserve(b, 40)
    assert b.fits(0)  # full of tokens, yet a request reserving none still has a slot
    assert ac.place("m", 1) is None
    assert b.load == 1.0


def test_load_is_the_tighter_limit() -> None:
    b = backend("b", seqs=4, kv=1000)
    b.in_flight, b.booked_tokens = 1, 900
    assert b.load == pytest.approx(0.9)
    b.in_flight, b.booked_tokens = 3, 100
    assert b.load == pytest.approx(0.75)


def test_capacity_limits_must_be_positive() -> None:
    ac = AdmissionController()
    with pytest.raises(ValueError, match="'x'"):
        ac.add(backend("x", seqs=0))
    with pytest.raises(ValueError, match="capacity"):
        ac.add(backend("y", kv=0))
    assert list(ac.backends()) == []


# -- placement -----------------------------------------------------------------------------------


def test_place_picks_the_least_loaded_backend() -> None:
    ac = AdmissionController([backend("b1", seqs=4, kv=1000), backend("b2", seqs=8, kv=1000)])
    b1, b2 = ac.get("b1"), ac.get("b2")
    ac.reserve(b1, 100)  # b1 load max(1/4, 0.1) = 0.25
    ac.reserve(b2, 200)  # b2 load max(1/8, 0.2) = 0.2
    assert ac.place("m", 10) is b2
    ac.reserve(b2, 200)  # b2: max(2/8, 0.4) = 0.4
    assert ac.place("m", 10) is b1


def test_place_spreads_over_equal_backends() -> None:
    ac = AdmissionController([backend(f"b{i}", seqs=4, kv=1000) for i in range(3)])
    placed = []
    for _ in range(6):
        b = ac.place("m", 100)
        assert b is not None
        ac.reserve(b, 100)
        placed.append(b.name)
    assert sorted(placed) == ["b0", "b0", "b1", "b1", "b2", "b2"]
    assert placed[:3] == ["b0", "b1", "b2"]  # ties go to the first backend configured
    assert ac.in_flight() == 6


def test_place_falls_back_to_a_busier_backend_that_fits() -> None:
    ac = AdmissionController([backend("small", seqs=8, kv=100), backend("big", seqs=2, kv=5000)])
    ac.reserve(ac.get("big"), 10)  # big: load 0.5; small: load 0
    assert placed(ac, "m", 50) == "small"
    assert placed(ac, "m", 500) == "big"  # only big has room


def test_place_honours_model_and_exclude() -> None:
    ac = AdmissionController(
        [
            backend("llama-1", models=("llama",)),
            backend("llama-2", models=("llama", "mistral")),
            backend("qwen", models=("qwen",)),
        ]
    )
    ac.reserve(ac.get("llama-2"), 500)
    assert placed(ac, "llama", 10) == "llama-1"
    assert placed(ac, "llama", 10, exclude=["llama-1"]) == "llama-2"
    assert ac.place("llama", 10, exclude=("llama-1", "llama-2")) is None
    assert placed(ac, "mistral", 10) == "llama-2"
    assert placed(ac, "qwen", 10, exclude=iter(["llama-1"])) == "qwen"
    assert ac.place("gpt", 10) is None
    assert [b.name for b in ac.serving("llama")] == ["llama-1", "llama-2"]


def test_unhealthy_backends_are_skipped() -> None:
    ac = AdmissionController([backend("b1"), backend("b2")])
    b1, b2 = ac.get("b1"), ac.get("b2")
    ac.reserve(b2, 900)
    b1.healthy = False
    assert not b1.fits(1)
    assert ac.place("m", 10) is b2  # busier, but the only healthy one
    b2.healthy = False
    assert ac.place("m", 10) is None
    b1.healthy = True  # back up: used again
    assert ac.place("m", 10) is b1


# -- can_ever_fit --------------------------------------------------------------------------------


def test_can_ever_fit_ignores_current_load_but_not_capacity() -> None:
    ac = AdmissionController(
        [backend("a", kv=1000, models=("m",)), backend("b", kv=4000, models=("m", "n"))]
    )
    for _ in range(4):
        ac.reserve(ac.get("b"), 900)
    assert ac.place("m", 3000) is None  # full right now...
    assert ac.can_ever_fit("m", 3000)  # ...but it can run once b drains
    assert ac.can_ever_fit("m", 4000)
    assert not ac.can_ever_fit("m", 4001)
    assert ac.can_ever_fit("n", 4000)
    assert not ac.can_ever_fit("missing-model", 1)
    ac.get("b").healthy = False  # health is temporary; capacity is not
    assert ac.can_ever_fit("m", 4000)


# -- release -------------------------------------------------------------------------------------


def test_release_restores_state() -> None:
    ac = AdmissionController([backend("b", seqs=3, kv=300)])
    b = ac.get("b")
    before = state(b)
    rs = [ac.reserve(b, t) for t in (100, 50, 150)]
    assert rs[0] == Reservation("b", 100)
    assert state(b) == (3, 300) and not b.fits(0)
    ac.release(rs[1])
    assert state(b) == (2, 250)
    assert ac.place("m", 50) is b and ac.place("m", 51) is None
    ac.release(rs[0])
    ac.release(rs[2])
    assert state(b) == before and b.load == 0
    assert b.admitted_total == 3  # lifetime count is not released
    assert ac.in_flight() == 0


def test_over_release_raises_and_leaves_state_alone() -> None:
    ac = AdmissionController([backend("b")])
    b = ac.get("b")
    r = ac.reserve(b, 100)
    ac.release(r)
    with pytest.raises(AssertionError, match="released more than was reserved"):
        ac.release(r)
    assert state(b) == (0, 0)
    keep = ac.reserve(b, 10)
    with pytest.raises(AssertionError):
        ac.release(Reservation("b", 11))  # more tokens than are reserved
    assert state(b) == (1, 10)
    ac.release(keep)
    assert state(b) == (0, 0)


def test_release_for_a_removed_backend_is_ignored() -> None:
    ac = AdmissionController([backend("b")])
    r = ac.reserve(ac.get("b"), 10)
    fresh = AdmissionController([backend("other")])  # e.g. rebuilt by a config reload
    fresh.release(r)
    assert fresh.in_flight() == 0


def test_reserve_release_cycle_keeps_invariants() -> None:
    """A random walk of reserve/release never breaks either limit when placement is obeyed."""
    rng = random.Random(7)
    ac = AdmissionController(
        [backend("b1", seqs=5, kv=800), backend("b2", seqs=3, kv=1500), backend("b3", seqs=9)]
    )
    held: list[Reservation] = []
    for _ in range(2000):
        if held and rng.random() < 0.45:
            ac.release(held.pop(rng.randrange(len(held))))
        else:
            tokens = rng.randint(1, 700)
            b = ac.place("m", tokens, exclude=[rng.choice(["b1", "b2", "b3", "none"])])
            if b is not None:
                held.append(ac.reserve(b, tokens))
        for b in ac.backends():
            assert 0 <= b.in_flight <= b.max_num_seqs
            assert 0 <= b.reserved_tokens <= b.max_kv_tokens
            mine = [r.tokens for r in held if r.backend == b.name]
            assert (b.in_flight, b.reserved_tokens) == (len(mine), sum(mine))
    for r in held:
        ac.release(r)
    assert ac.in_flight() == 0

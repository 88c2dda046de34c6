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


@pytest.mark.parametrize("mode", ["reserve", "peak", "predict"])
def test_a_share_keeps_to_its_part_of_sequences_and_kv_and_a_lone_request_fits(mode: str) -> None:
    """A replica cut off from the shared ledger (share = replicas last seen) keeps to
    ``1/share`` of each limit, whatever the KV mode; alone on its share any request fits."""
    seqs = AdmissionController([backend("b", seqs=8, kv=100_000)])
    seqs.get("b").kv_admission = mode  # type: ignore[assignment]
    for _ in range(4):
        b = seqs.place("m", 100, share=2)
        assert b is not None
        seqs.reserve(b, 100, 50, 50)
    assert seqs.place("m", 100, share=2) is None
    assert seqs.place("m", 100) is not None  # the whole backend has room
    kv = AdmissionController([backend("b", seqs=8, kv=1_000)])
    kv.get("b").kv_admission = mode  # type: ignore[assignment]
    big = kv.place("m", 700, prompt=600, expect=100, share=2)
    assert big is not None  # more than half the cache, but alone
    kv.reserve(big, 700, 600, 100)
    assert kv.place("m", 100, prompt=50, expect=50, share=2) is None
    assert kv.place("m", 100, prompt=50, expect=50) is not None


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


# -- kv_admission: "peak" ------------------------------------------------------------------------


def peak_backend(name: str = "p", seqs: int = 64, kv: int = 1000) -> BackendSlots:
    return BackendSlots(name, frozenset({"m"}), seqs, kv, kv_admission="peak")


def brute_peak(held: list[tuple[int, int]]) -> int:
    """Largest memory over future steps, every request growing one token per step until its
    reservation is used up: the definition the sorted formula computes."""
    horizon = max((left for _, left in held), default=0)
    return max(
        (sum(run + t for run, left in held if left >= t) for t in range(horizon + 1)), default=0
    )


def sorted_peak(held: list[tuple[int, int]]) -> int:
    """The formula, computed from scratch: sort by left descending, max of cum(run) + left*i."""
    out, cum = 0, 0
    for i, (run, left) in enumerate(sorted(held, key=lambda e: -e[1]), 1):
        cum += run
        out = max(out, cum + left * i)
    return out


def test_peak_matches_hand_computed_examples() -> None:
    ac = AdmissionController([peak_backend(kv=1000)])
    b = ac.get("p")
    assert b.reserved_tokens == 0 and b.peak_with(10, 90) == 100  # alone: prompt + reserve
    ac.reserve(b, 100, prompt=10)  # (run 10, left 90)
    ac.reserve(b, 300, prompt=200)  # (run 200, left 100)
    # sorted by left: (200, 100), (10, 90): max(200 + 100*1, 210 + 90*2) = 390
    assert b.reserved_tokens == 390 == brute_peak([(10, 90), (200, 100)])
    assert b.booked_tokens == 400
    # a candidate (50, 20) goes last: max(300, 390, 260 + 20*3) = 390
    assert b.peak_with(50, 20) == 390
    # a candidate (0, 500) goes first: max(0 + 500, 200 + 100*2, 210 + 90*3) = 500
    assert b.peak_with(0, 500) == 500
    # a candidate (100, 95) goes between: max(300, 300 + 95*2, 310 + 90*3) = 580
    assert b.peak_with(100, 95) == 580 == brute_peak([(10, 90), (200, 100), (100, 95)])
    # equal lefts: any order among them gives the same maximum
    assert b.peak_with(7, 90) == brute_peak([(10, 90), (200, 100), (7, 90)]) == 217 + 90 * 3


def test_peak_fits_compares_with_capacity_inclusively() -> None:
    ac = AdmissionController([peak_backend(kv=580)])
    b = ac.get("p")
    ac.reserve(b, 100, prompt=10)
    ac.reserve(b, 300, prompt=200)
    assert b.fits(195, prompt=100)  # (100, 95): peak exactly 580
    assert not b.fits(205, prompt=110)  # (110, 95): 320 + 90*3 = 590
    assert ac.place("m", 195, prompt=100) is b
    assert ac.place("m", 205, prompt=110) is None
    b.healthy = False
    assert not b.fits(1, prompt=1)


def test_note_output_lowers_the_peak_and_release_forgets_the_request() -> None:
    ac = AdmissionController([peak_backend(kv=1000)])
    b = ac.get("p")
    short = ac.reserve(b, 100, prompt=10)
    long = ac.reserve(b, 300, prompt=200)
    # both advance 50 tokens together: the future peak does not change
    ac.note_output(short, 50)
    ac.note_output(long, 50)
    assert (short.generated, short.run, short.left) == (50, 60, 40)
    assert b.reserved_tokens == 390 == brute_peak([(60, 40), (250, 50)])
    # the short one stops early (EOS): its share is gone, the long one's full reservation stays
    ac.release(short)
    assert b.reserved_tokens == 300 and b.in_flight == 1 and b.booked_tokens == 300
    # over-generation never makes `left` negative
    ac.note_output(long, 500)
    assert long.left == 0 and b.reserved_tokens == 750
    ac.release(long)
    assert (b.in_flight, b.booked_tokens, b.reserved_tokens) == (0, 0, 0)
    with pytest.raises(AssertionError, match="released more than was reserved"):
        ac.release(long)
    keep = ac.reserve(b, 50, prompt=5)
    with pytest.raises(AssertionError):
        ac.release(Reservation("p", 50, 5))  # equal, but not the one reserved
    assert b.in_flight == 1
    ac.release(keep)


def test_peak_admits_strictly_more_than_reserve_on_mixed_lengths() -> None:
    """Mixed lengths: a few long generations and many short ones, as on the arena trace."""

    def admitted(mode: str) -> int:
        ac = AdmissionController(
            [BackendSlots("b", frozenset({"m"}), 256, 4000, kv_admission=mode)]  # type: ignore[arg-type]
        )
        b = ac.get("b")
        count = 0
        for i in range(200):
            prompt, out = (50, 1000) if i % 5 == 0 else (100, 50)
            if not b.fits(prompt + out, prompt):
                break
            r = ac.reserve(b, prompt + out, prompt)
            ac.note_output(r, 10)  # the batch moves on between arrivals
            count += 1
        return count

    reserve, peak = admitted("reserve"), admitted("peak")
    assert reserve == 10  # (1050 + 4 * 150) * 2 = 3300: a third long one (1050) is too many
    assert peak == 15 > reserve


def test_peak_never_exceeds_capacity_in_lockstep() -> None:
    """Randomised: every step each in-flight request generates one token and stops at a random
    length <= its reservation; admission runs between steps. Memory (prompt + generated of the
    in-flight requests) never exceeds the budget, and the estimate stays an upper bound."""
    rng = random.Random(11)
    kv = 3000
    ac = AdmissionController([peak_backend(seqs=48, kv=kv)])
    b = ac.get("p")
    live: list[tuple[Reservation, int]] = []  # (reservation, actual output length)
    admitted = 0
    high_water = 0
    for step in range(2000):
        for _ in range(rng.randint(0, 3)):  # arrivals
            prompt = rng.randint(1, 400)
            out = rng.choice([rng.randint(1, 30), rng.randint(1, 600)])
            if b.fits(prompt + out, prompt):
                live.append((ac.reserve(b, prompt + out, prompt), rng.randint(1, out)))
                admitted += 1
        assert b.reserved_tokens <= kv
        if step % 25 == 0:
            assert b.reserved_tokens == brute_peak([(r.run, r.left) for r, _ in live])
        still = []
        for r, actual in live:  # one step: every request generates a token
            ac.note_output(r, 1)
            if r.generated >= actual:
                ac.release(r)
            else:
                still.append((r, actual))
        live = still
        memory = sum(r.run for r, _ in live)
        high_water = max(high_water, memory)
        assert memory <= kv
    assert admitted > 300 and high_water > kv * 0.8  # it was actually full at times
    for r, _ in live:
        ac.release(r)
    assert (b.in_flight, b.reserved_tokens) == (0, 0)


def test_peak_cached_order_survives_random_progress() -> None:
    """Requests advancing at different rates (lagging streams) reorder the cache; the cached
    answer always equals the brute-force one."""
    rng = random.Random(5)
    ac = AdmissionController([peak_backend(seqs=1000, kv=10**9)])
    b = ac.get("p")
    live: list[Reservation] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.4 or not live:
            live.append(ac.reserve(b, rng.randint(2, 800), rng.randint(1, 100)))
        elif op < 0.55:
            ac.release(live.pop(rng.randrange(len(live))))
        else:
            ac.note_output(rng.choice(live), rng.randint(1, 40))
        cand = (rng.randint(0, 300), rng.randint(0, 300))
        held = [(r.run, r.left) for r in live]
        assert b.peak_with(*cand) == sorted_peak([*held, cand])
        assert b.reserved_tokens == sorted_peak(held)
        if len(live) < 12:  # the formula is the definition (brute force is slow)
            assert sorted_peak(held) == brute_peak(held)


def test_peak_keeps_can_ever_fit_and_rejects_unknown_modes() -> None:
    ac = AdmissionController([peak_backend(kv=1000)])
    assert ac.can_ever_fit("m", 1000) and not ac.can_ever_fit("m", 1001)
    with pytest.raises(ValueError, match="kv_admission"):
        ac.add(BackendSlots("x", frozenset({"m"}), 4, 100, kv_admission="maybe"))  # type: ignore[arg-type]


def test_adjust_prompt_corrects_the_booking_to_the_backends_count() -> None:
    from gateway.admission import AdmissionController, BackendSlots

    b = BackendSlots("b", frozenset({"m"}), max_num_seqs=4, max_kv_tokens=1000)
    ctl = AdmissionController([b])
    r = ctl.reserve(b, 300, prompt=100)  # estimate: 100 prompt + 200 output
    assert ctl.adjust_prompt(r, 130) == 30  # the backend's tokenizer counted 130
    assert b.reserved_tokens == 330 and r.tokens == 330
    assert ctl.adjust_prompt(r, 130) == 0
    ctl.release(r)
    assert b.reserved_tokens == 0 and b.in_flight == 0


def test_adaptive_cap_shrinks_on_backend_queue_and_grows_back() -> None:
    from gateway.admission import BackendSlots, adapt_seq_cap

    b = BackendSlots("b", frozenset({"m"}), max_num_seqs=20, max_kv_tokens=10**6)
    b.in_flight = 20
    assert adapt_seq_cap(b, waiting=8, running=12, gateway_queued=5) is False
    assert b.seq_cap == 12 and not b.fits(1)  # 20 in flight, cap 12
    b.in_flight = 12
    assert not b.fits(1)
    assert adapt_seq_cap(b, waiting=0, running=12, gateway_queued=0) is False  # no demand
    assert b.seq_cap == 12
    assert adapt_seq_cap(b, waiting=0, running=12, gateway_queued=3) is True  # +10 %, >= 1
    assert b.seq_cap == 13 and b.fits(1)
    for _ in range(20):
        b.in_flight = b.seq_cap or b.max_num_seqs
        adapt_seq_cap(b, waiting=0, running=b.in_flight, gateway_queued=3)
    assert b.seq_cap is None  # back to max_num_seqs


# -- "predict" mode --------------------------------------------------------------------------------


def predict_backend(seqs: int = 256, kv: int = 10_000, block: int = 16) -> BackendSlots:
    b = BackendSlots("v", frozenset({"m"}), seqs, kv, kv_admission="predict")
    b.block_size = block
    return b


def test_predict_plans_for_the_prediction_not_the_context() -> None:
    """32k context, no max_tokens: reserve books the whole rest of the context; predict plans
    for the predicted output and admits as many requests as the cache really holds."""
    counts = {}
    for mode in ("reserve", "predict"):
        b = BackendSlots("v", frozenset({"m"}), 256, 450_000, kv_admission=mode)
        ac = AdmissionController([b])
        n = 0
        while ac.place("m", 32_768, prompt=1_000, expect=400) is not None and n < 1_000:
            ac.reserve(b, 32_768, 1_000, expect=400)
            n += 1
        counts[mode] = n
    assert counts["reserve"] == 450_000 // 32_768  # 13
    assert counts["predict"] == 256  # the sequence limit binds, not the KV budget


def test_predict_tracks_current_use_and_pads_a_block_per_request() -> None:
    ac = AdmissionController([predict_backend(kv=1_000, block=16)])
    b = ac.get("v")
    r = ac.reserve(b, 5_000, prompt=100, expect=200)
    assert (r.run, r.left) == (100, 200)
    assert b.reserved_tokens == 300 + 16
    ac.note_output(r, 150)  # current use exact, remaining prediction shrinks
    assert (r.run, r.left) == (250, 50) and b.reserved_tokens == 300 + 16
    ac.note_output(r, 100)  # outran its prediction: a quarter of what it generated is expected
    assert (r.generated, r.left) == (250, 62) and b.reserved_tokens == 350 + 62 + 16
    # the peak with the candidate (350 + its prompt, all held at once) + one block per request
    # must fit the budget, inclusively
    assert b.fits(1_000, prompt=1_000 - 350 - 32, expect=0)
    assert not b.fits(1_000, prompt=1_000 - 350 - 31, expect=0)
    ac.release(r)
    assert (b.in_flight, b.booked_tokens, b.reserved_tokens) == (0, 0, 0)


def test_predict_left_never_exceeds_the_reservation() -> None:
    ac = AdmissionController([predict_backend()])
    b = ac.get("v")
    r = ac.reserve(b, 130, prompt=100, expect=500)  # max_tokens 30 caps a larger prediction
    assert r.left == 30
    ac.note_output(r, 29)
    assert r.left == 1
    ac.note_output(r, 5)
    assert r.left == 0


def test_kv_scale_shrinks_on_preemption_or_a_real_queue_and_recovers_to_the_cache() -> None:
    from gateway.admission import KV_SCALE_MAX, KV_SCALE_MIN, adapt_kv_scale

    b = predict_backend(kv=10_000)
    assert b.kv_budget == 10_000
    # a few waiting while 40 run are requests just sent, not over-admission
    kw = {"kv_usage": 0.5, "gateway_queued": 5, "running": 40}
    assert not adapt_kv_scale(b, waiting=9, preempted=0, **kw)
    assert b.kv_scale == 1.0
    adapt_kv_scale(b, waiting=0, preempted=2, **kw)
    assert b.kv_scale == pytest.approx(0.85) and b.kv_budget == 8_500
    adapt_kv_scale(b, waiting=11, preempted=0, **kw)
    assert b.kv_scale == pytest.approx(0.85 * 0.85)
    for _ in range(50):
        adapt_kv_scale(b, waiting=0, preempted=1, **kw)
    assert b.kv_scale == KV_SCALE_MIN
    # no trouble: back towards the whole cache, never past it; True: the queue may go now
    assert adapt_kv_scale(b, waiting=0, preempted=0, **kw)
    assert not adapt_kv_scale(b, waiting=0, preempted=0, kv_usage=0.99, gateway_queued=5)
    for _ in range(50):
        adapt_kv_scale(b, waiting=0, preempted=0, **kw)
    assert b.kv_scale == KV_SCALE_MAX == 1.0
    r = predict_backend()
    r.kv_admission = "reserve"
    assert not adapt_kv_scale(r, waiting=5, preempted=5, kv_usage=1.0, gateway_queued=1)
    assert r.kv_scale == 1.0


# -- rate budgets (a hosted API's quota) -------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def quota_backend(clock: FakeClock, tpm: int | None = 1000, rpm: int | None = None) -> BackendSlots:
    from gateway.admission import Quota

    b = BackendSlots("q", frozenset({"m"}), 1000, 10**9, kv_admission="predict")
    b.quota = Quota(tpm, rpm, 60.0, clock)
    return b


def test_quota_paces_tokens_over_a_sliding_window_and_books_the_prediction() -> None:
    clock = FakeClock()
    ac = AdmissionController([quota_backend(clock, tpm=1000)])
    b = ac.get("q")
    assert b.quota is not None
    # 100 prompt + 300 predicted (of up to 5,000): books 400
    r1 = ac.reserve(b, 5_100, prompt=100, expect=300)
    assert b.quota.used == 400
    clock.t += 10
    r2 = ac.reserve(b, 5_100, prompt=100, expect=300)
    assert b.quota.used == 800
    assert not b.fits(5_100, prompt=100, expect=300)  # 1,200 > 1,000
    assert b.fits(5_100, prompt=100, expect=100)  # 1,000 fits, inclusively
    ac.note_output(r1, 350)  # outran its prediction: the window counts what it really cost
    assert b.quota.used == 850
    ac.release(r1)
    ac.release(r2)  # stopped at 0 output: only its prompt counts
    assert b.quota.used == 450 + 100
    clock.t += 50.5  # r1 (booked at t=1000) left the window, r2 (t=1010) has not
    assert b.fits(5_100, prompt=100, expect=800) and b.quota.used == 100
    assert b.quota.next_change() == pytest.approx(9.5)


def test_quota_counts_requests_backs_off_and_takes_an_oversized_request_alone() -> None:
    clock = FakeClock()
    b = quota_backend(clock, tpm=1000, rpm=2)
    ac = AdmissionController([b])
    assert b.quota is not None
    assert b.fits(50_000, prompt=5_000, expect=0)  # larger than the budget: an empty window
    big = ac.reserve(b, 50_000, prompt=5_000, expect=0)
    assert not b.fits(10, prompt=5, expect=5)  # ... then nothing until it leaves
    ac.void(big)  # the provider refused it: it counts nothing
    ac.release(big)
    assert b.quota.used == 0 and b.fits(10, prompt=5, expect=5)
    ac.reserve(b, 10, prompt=5, expect=5)
    ac.reserve(b, 10, prompt=5, expect=5)
    assert b.quota.requests == 2 and not b.fits(10, prompt=5, expect=5)  # rpm 2
    clock.t += 61
    assert b.fits(10, prompt=5, expect=5)
    b.quota.back_off(2.0)  # a 429 with Retry-After: 2
    assert not b.fits(10, prompt=5, expect=5) and b.quota.next_change() == pytest.approx(2.0)
    clock.t += 2.0
    assert b.fits(10, prompt=5, expect=5)
    b.quota.learn(5000, None)  # announced by the provider
    assert (b.quota.tpm, b.quota.rpm) == (5000, 2)

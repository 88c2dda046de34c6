"""Pure engine core: batching, chunked prefill, block KV, preemption, admission gating."""

from __future__ import annotations

import time

import pytest

from backends.sim.calibrate import overload_arrivals, run_virtual
from backends.sim.costmodel import CostModel, get_profile
from backends.sim.engine import EngineConfig, EngineCore, StepResult, peak_tokens

COST = CostModel(l_floor=0.01, a=0.0, b=1e-5)


def make(**kw: int | bool) -> EngineCore:
    base: dict[str, int | bool] = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 64,
        "kv_cache_tokens": 1024,
        "max_model_len": 512,
    }
    base.update(kw)
    return EngineCore(EngineConfig(**base), COST)  # type: ignore[arg-type]


def run_all(core: EngineCore, limit: int = 10_000) -> list[StepResult]:
    results = []
    t = 0.0
    while core.has_unfinished():
        r = core.step(t)
        t = r.end
        results.append(r)
        assert len(results) < limit
    return results


def test_first_token_after_chunked_prefill_then_one_per_step() -> None:
    core = make(max_num_batched_tokens=32)
    core.add_request("a", prompt_tokens=100, max_tokens=3, output_len=3, arrival=0.0)
    results = run_all(core)
    assert [r.num_scheduled_tokens for r in results] == [32, 32, 32, 4, 1, 1]
    assert [len(r.outputs) for r in results] == [0, 0, 0, 1, 1, 1]
    first = results[3].outputs[0]
    assert first.first_token and first.new_tokens == 1 and first.num_output_tokens == 1
    last = results[-1].outputs[0]
    assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 3
    assert not core.has_unfinished() and core.kv_used_tokens == 0


def test_decodes_first_then_prefill_within_budget() -> None:
    core = make(max_num_batched_tokens=20)
    core.add_request("a", 5, 10, 10, 0.0)
    core.step(0.0)  # prefill a, first token
    core.add_request("b", 50, 10, 10, 0.0)
    r = core.step(1.0)
    assert r.num_decodes == 1 and r.num_prefill_tokens == 19 and r.num_scheduled_tokens == 20
    assert r.admitted == ["b"]
    assert r.decode_context_tokens == 6  # prompt 5 + 1 generated token


def test_kv_is_allocated_in_blocks() -> None:
    core = make(kv_cache_tokens=160)
    core.add_request("a", 17, 10, 10, 0.0)
    core.step(0.0)
    # 17 prompt tokens computed -> 2 blocks of 16
    assert core.kv_used_tokens == 32
    assert core.kv_usage == pytest.approx(2 / 10)
    info = core.request_info("a")
    assert info is not None and info.num_blocks == 2 and info.status == "running"


def test_finish_reasons() -> None:
    core = make()
    core.add_request("eos", 4, 10, 3, 0.0)
    core.add_request("len", 4, 3, 3, 0.0)
    reasons = {o.req_id: o.finish_reason for r in run_all(core) for o in r.outputs if o.finished}
    assert reasons == {"eos": "stop", "len": "length"}


def test_max_num_seqs_and_fcfs() -> None:
    core = make(max_num_seqs=2)
    for i in range(5):
        core.add_request(f"r{i}", 8, 4, 4, float(i))
    core.step(0.0)
    assert core.running_ids() == ["r0", "r1"] and core.waiting_ids() == ["r2", "r3", "r4"]
    order = [o.req_id for r in run_all(core) for o in r.outputs if o.finished]
    assert order == ["r0", "r1", "r2", "r3", "r4"]


def test_waiting_head_blocks_when_it_does_not_fit() -> None:
    core = make(kv_cache_tokens=64, max_num_batched_tokens=512)  # 4 blocks
    core.add_request("a", 40, 8, 8, 0.0)  # 3 blocks
    core.add_request("big", 40, 8, 8, 0.0)  # needs 3, only 1 left
    core.add_request("small", 4, 4, 4, 0.0)  # would fit, but FCFS: no skipping
    core.step(0.0)
    assert core.running_ids() == ["a"] and core.waiting_ids() == ["big", "small"]


def test_preemption_recompute_most_recent_to_front() -> None:
    # 6 blocks of 16. Two requests with 16-token prompts grow until KV runs out.
    core = make(kv_cache_tokens=96, max_num_batched_tokens=256)
    core.add_request("old", 16, 60, 60, 0.0)
    core.add_request("new", 16, 60, 60, 0.0)
    core.add_request("late", 16, 4, 4, 0.0)
    t = 0.0
    preempted: list[str] = []
    outs: dict[str, int] = {}
    while not preempted:
        r = core.step(t)
        t = r.end
        preempted = r.preempted
        outs.update({o.req_id: o.num_output_tokens for o in r.outputs if o.finished})
    assert preempted[0] == "late" or preempted[0] == "new"
    victim = preempted[0]
    assert core.waiting_ids()[0] == victim  # back at the FRONT of the queue
    info = core.request_info(victim)
    assert info is not None and info.num_computed_tokens == 0 and info.num_blocks == 0
    assert info.num_preemptions == 1
    generated_before = info.num_output_tokens
    assert core.num_preemptions >= 1
    # Everything still finishes with exactly its output length; recompute is a prefill.
    while core.has_unfinished():
        r = core.step(t)
        t = r.end
        for o in r.outputs:
            if o.finished:
                outs[o.req_id] = o.num_output_tokens
            if o.req_id == victim and o.num_output_tokens == generated_before + 1:
                assert not o.first_token
    assert outs == {"old": 60, "new": 60, "late": 4}
    assert core.kv_used_tokens == 0


def test_preemption_picks_most_recently_admitted() -> None:
    core = make(kv_cache_tokens=64, max_num_batched_tokens=256)  # 4 blocks
    core.add_request("a", 15, 40, 40, 0.0)
    core.add_request("b", 15, 40, 40, 0.0)
    t = 0.0
    while True:
        r = core.step(t)
        t = r.end
        if r.preempted:
            break
    assert r.preempted == ["b"]
    assert core.running_ids() == ["a"] and core.waiting_ids() == ["b"]
    assert r.admitted == []  # no admission in a step that preempted


def test_abort_frees_kv_and_unknown_is_false() -> None:
    core = make()
    core.add_request("a", 100, 50, 50, 0.0)
    core.add_request("b", 10, 5, 5, 0.0)
    core.step(0.0)
    assert core.kv_used_tokens > 0
    assert core.abort("a") and core.abort("b")
    assert core.kv_used_tokens == 0 and core.num_running == 0 and core.num_waiting == 0
    assert not core.abort("a") and not core.abort("nope")
    assert not core.has_unfinished()
    assert core.step(5.0).duration == 0.0


def test_abort_waiting_request() -> None:
    core = make(max_num_seqs=1)
    core.add_request("a", 10, 5, 5, 0.0)
    core.add_request("b", 10, 5, 5, 0.0)
    core.step(0.0)
    assert core.abort("b") and core.waiting_ids() == []


def test_reserve_full_kv_and_admission_gating() -> None:
    core = EngineCore(
        EngineConfig(
            max_num_seqs=16,
            max_num_batched_tokens=1024,
            kv_cache_tokens=1024,
            max_model_len=512,
            admit_every_n_steps=3,
            kv_admission="reserve",
        ),
        COST,
    )
    core.add_request("a", 20, 100, 100, 0.0)
    core.step(0.0)
    assert core.kv_used_tokens == 128  # ceil(120 / 16) = 8 blocks reserved up front
    core.add_request("b", 20, 100, 100, 0.0)
    admitted_at = []
    for i in range(1, 8):
        if core.step(float(i)).admitted:
            admitted_at.append(i)
    assert admitted_at == [3]  # steps 1, 2 gated; admission on the 3rd step since the last
    assert core.kv_used_tokens == 256


def test_rejects_requests_that_can_never_run() -> None:
    core = make(kv_cache_tokens=64, max_model_len=512)
    with pytest.raises(ValueError, match="KV cache"):
        core.add_request("a", 60, 60, 60, 0.0)
    with pytest.raises(ValueError, match="maximum context length"):
        core.add_request("a", 500, 60, 60, 0.0)
    with pytest.raises(ValueError, match="output_len"):
        core.add_request("a", 5, 6, 7, 0.0)
    core.add_request("a", 5, 6, 6, 0.0)
    with pytest.raises(ValueError, match="duplicate"):
        core.add_request("a", 5, 6, 6, 0.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        EngineConfig(kv_cache_tokens=8)
    with pytest.raises(ValueError, match="kv_admission must be one of blocks, reserve, peak"):
        EngineConfig(kv_admission="lazy")  # type: ignore[arg-type]
    cfg = EngineConfig.from_profile(get_profile("a10g-llama2-7b"), max_num_seqs=7)
    assert cfg.max_num_seqs == 7 and cfg.kv_admission == "peak" and cfg.block_size == 1
    assert cfg.num_blocks * cfg.block_size == 10_000
    cfg = EngineConfig.from_profile(get_profile("a10g-llama2-7b"), kv_admission="reserve")
    assert cfg.kv_admission == "reserve"
    cfg = EngineConfig.from_profile(get_profile("h100-llama3-8b"))
    assert cfg.kv_admission == "blocks" and cfg.block_size == 16


def test_step_durations_follow_the_cost_model() -> None:
    core = make()
    core.add_request("a", 30, 2, 2, 0.0)
    r1 = core.step(0.0)
    assert r1.duration == pytest.approx(COST.step_time(30, 0))
    r2 = core.step(r1.end)
    assert r2.duration == pytest.approx(COST.step_time(1, 31))


def test_paper_overload_throughput_matches_calibration() -> None:
    stats = run_virtual(get_profile("a10g-llama2-7b"), overload_arrivals(360.0), 360.0)
    assert 860 <= stats.throughput <= 920
    assert stats.preemptions == 0


def test_hot_loop_is_fast() -> None:
    # ~1,500 requests over 600 s on an H100 profile must simulate in a few seconds.
    from backends.sim.calibrate import Arrival

    arrivals = [
        Arrival(i * 0.4, f"c{i % 7}", 100 + (i * 37) % 900, 50 + (i * 53) % 500)
        for i in range(1500)
    ]
    t0 = time.perf_counter()
    stats = run_virtual(get_profile("h100-llama3-8b"), arrivals, 700.0)
    assert stats.completed == 1500
    assert time.perf_counter() - t0 < 10.0


# -- kv_admission "peak" (the paper's S-LoRA engine) ----------------------------------------------


def test_peak_tokens_formula() -> None:
    assert peak_tokens([]) == 0
    assert peak_tokens([(10, 90)]) == 100
    # sorted by left: (200, 100), (10, 90), (100, 20): max(300, 210 + 180, 310 + 60)
    assert peak_tokens([(10, 90), (100, 20), (200, 100)]) == 390


def peak_engine(kv: int = 1000, block_size: int = 1, **kw: int) -> EngineCore:
    base: dict[str, int | str] = {
        "max_num_seqs": 64,
        "max_num_batched_tokens": 2048,
        "kv_cache_tokens": kv,
        "max_model_len": 1024,
        "block_size": block_size,
        "kv_admission": "peak",
    }
    base.update(kw)
    return EngineCore(EngineConfig(**base), COST)  # type: ignore[arg-type]


def test_peak_admits_what_the_peak_allows_and_no_more() -> None:
    core = peak_engine(kv=1000)
    sizes = {
        "long": (100, 500),  # alone: 600
        "short": (300, 50),  # sorted (100, 500), (300, 50): max(600, 400 + 50*2) = 600
        "more": (300, 100),  # max(600, 400 + 100*2, 700 + 50*3) = 850
        "full": (200, 20),  # ..., 900 + 20*4 = 980
        "tiny": (30, 10),  # ..., 930 + 10*5 = 980
        "over": (50, 5),  # ..., 980 + 5*6 = 1010 > 1000: waits
    }
    for rid, (prompt, out) in sizes.items():
        core.add_request(rid, prompt, out, out, 0.0)
    r = core.step(0.0)
    assert r.admitted == ["long", "short", "more", "full", "tiny"]
    assert core.waiting_ids() == ["over"]
    # reserve mode stops after two: 600 + 350 = 950, + 400 > 1000
    core = peak_engine(kv=1000, kv_admission="reserve")  # type: ignore[arg-type]
    for rid, (prompt, out) in sizes.items():
        core.add_request(rid, prompt, out, out, 0.0)
    assert core.step(0.0).admitted == ["long", "short"]


def test_peak_never_exceeds_the_cache_and_never_preempts_on_mixed_lengths() -> None:
    """Random mixed lengths (EOS before max_tokens too), 16-token blocks, chunked prefill,
    admission gating: the cache is never over-allocated and nothing is preempted."""
    import random

    rng = random.Random(3)
    for block_size, gate in ((1, 1), (16, 1), (16, 10)):
        core = peak_engine(
            kv=4000, block_size=block_size, max_num_batched_tokens=256, admit_every_n_steps=gate
        )
        t = 0.0
        peak_running = 0
        for i in range(400):
            prompt = rng.randint(1, 600)
            max_tokens = rng.randint(1, 400)
            core.add_request(f"r{i}", prompt, max_tokens, rng.randint(1, max_tokens), t)
            for _ in range(rng.randint(0, 6)):
                r = core.step(t)
                t = r.end
                assert not r.preempted
                assert 0 <= core.num_free_blocks <= core.num_blocks
                peak_running = max(peak_running, core.num_running)
        run_all(core)
        assert core.num_preemptions == 0 and core.num_free_blocks == core.num_blocks
        assert peak_running > 10


def test_peak_runs_more_than_reserve_with_mixed_lengths() -> None:
    """A steady stream, one long generation for every two short ones: requests part-way
    through need only what they have left, so peak admission keeps more of them running."""

    def run(mode: str) -> tuple[int, float]:
        core = peak_engine(kv=4000, block_size=16, kv_admission=mode)  # type: ignore[arg-type]
        t, decodes, done, n = 0.0, 0, 0, 0
        for step in range(2000):
            if step % 8 == 0:
                out = 400 if n % 3 == 0 else 60
                core.add_request(f"r{n}", 60, out, out, t)
                n += 1
            r = core.step(t)
            t = r.end
            assert not r.preempted
            decodes += r.num_decodes
            done += sum(o.finished for o in r.outputs)
        return done, decodes / 2000

    (done_reserve, batch_reserve), (done_peak, batch_peak) = run("reserve"), run("peak")
    assert done_peak > 1.2 * done_reserve and batch_peak > 1.2 * batch_reserve


def test_blocks_mode_still_preempts() -> None:
    core = make(kv_cache_tokens=256, max_num_batched_tokens=512)  # vLLM-like default
    assert core.config.kv_admission == "blocks"
    for i in range(4):
        core.add_request(f"r{i}", 48, 100, 100, 0.0)
    run_all(core)
    assert core.num_preemptions > 0 and core.num_free_blocks == core.num_blocks


def test_calibration_with_peak_admission() -> None:
    """The paper profile (peak admission) stays in the paper's overload range."""
    stats = run_virtual(get_profile("a10g-llama2-7b"), overload_arrivals(360.0), 360.0)
    assert 876 <= stats.throughput <= 904 and stats.preemptions == 0


def test_peak_mode_runs_a_request_that_nearly_fills_the_cache() -> None:
    # prompt + max_tokens = the whole cache: the padded peak estimate exceeds it, but an idle
    # engine must still admit its head (it fits the blocks) instead of stalling for good
    core = make(kv_cache_tokens=512, max_model_len=512, kv_admission="peak")  # type: ignore[arg-type]
    assert core.check_request(8, 504) is None
    core.add_request("big", 8, 504, 504, 0.0)
    results = run_all(core)
    assert sum(o.new_tokens for r in results for o in r.outputs) == 504
    assert not core.has_unfinished() and core.kv_used_tokens == 0

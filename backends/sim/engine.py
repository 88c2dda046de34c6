"""Pure engine core of the simulated vLLM server: continuous batching in simulated time.

The core is a plain synchronous class; time is passed in, nothing sleeps, nothing does I/O. The
asyncio server (:mod:`backends.sim.loop`) drives it in (scaled) real time, and the fairness lab
drives the very same class in virtual time::

    core = EngineCore(EngineConfig.from_profile(profile), profile.cost)
    core.add_request("r1", prompt_tokens=256, max_tokens=256, output_len=256, arrival=0.0)
    t = 0.0
    while core.has_unfinished():
        result = core.step(t)          # plan and execute one step starting at t
        t += result.duration           # every output in result happens at t + duration

Scheduling follows vLLM v1's ``Scheduler.schedule()`` (vllm/v1/core/sched/scheduler.py):

* Every request has ``num_tokens`` (prompt + generated so far) and ``num_computed`` (tokens whose
  KV is in the cache). A step schedules ``num_tokens - num_computed`` tokens for it (capped by
  the step's token budget ``max_num_batched_tokens``: chunked prefill). When a step makes
  ``num_computed == num_tokens``, the request samples one token: the first token comes from the
  step that completes the prefill, then one token per step (decode).
* Running requests are scheduled first, in admission order (decodes and unfinished prefill
  chunks), then waiting requests in FCFS order while the budget, ``max_num_seqs`` and the KV
  cache allow. A waiting request that does not fit blocks those behind it (no skipping).
* KV is allocated in blocks of ``block_size`` tokens as tokens are computed. When a running
  request needs a block and none is free, the most recently admitted running request is
  preempted (recompute): its blocks are freed, its computed tokens are lost, it goes to the
  FRONT of the waiting queue and later recomputes prompt + generated tokens as a prefill. No
  waiting request is admitted in a step that preempted.
* ``admit_every_n_steps`` > 1 admits waiting requests only every n steps (or when nothing runs),
  as the VTC paper's S-LoRA-based engine does.
* ``kv_admission`` says when a waiting request's KV fits:

  - ``"blocks"`` (vLLM): the blocks of the tokens scheduled now are free; growth is not
    planned for, so a full cache preempts (above).
  - ``"reserve"``: the blocks of ``prompt + max_tokens`` are free and are allocated at
    admission (no preemption, but a short request holds its whole ``max_tokens``).
  - ``"peak"``: S-LoRA's check (``_can_add_new_req`` in the VTC artifact's
    ``vtc_req_queue.py``): with ``run`` = tokens held, ``left`` = output tokens still to come,
    sorted by ``left`` descending, the memory when request i finishes (every request growing
    one token per step) is ``sum(run[:i]) + left[i] * i``; admit while the largest of these,
    candidate included, fits the cache. Blocks are then allocated as tokens are computed, as
    in ``"blocks"``. The estimate is an upper bound (each request is padded by ``block_size -
    1`` tokens of block rounding, and by the steps its chunked prefill still needs), so a
    cache that admission keeps within it never preempts.

No asyncio, aiohttp or I/O imports here (a test asserts it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, get_args

from backends.sim.costmodel import CostModel, KvAdmission, Profile

__all__ = [
    "EngineConfig",
    "EngineCore",
    "FinishReason",
    "KvAdmission",
    "RequestInfo",
    "RequestOutput",
    "StepResult",
]

FinishReason = Literal["length", "stop", "abort"]


def peak_tokens(held: list[tuple[int, int]]) -> int:
    """Largest future KV use of ``(run, left)`` pairs growing one token per step together.

    ``run``: tokens held now; ``left``: tokens still to come. Sorted by ``left`` descending,
    request i (1-based) finishes when ``sum(run[:i]) + left[i] * i`` tokens are held; the peak
    is the largest of these (0 for no request). O(n log n).
    """
    if not held:
        return 0
    held = sorted(held, key=lambda e: -e[1])
    cum = accumulate(e[0] for e in held)
    return max(c + e[1] * i for i, (c, e) in enumerate(zip(cum, held, strict=True), 1))


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Static limits of the simulated engine (vLLM's flags of the same names).

    Attributes:
        max_num_seqs: most requests in the running batch.
        max_num_batched_tokens: token budget of one step (prefill chunks + decodes).
        kv_cache_tokens: KV-cache capacity in tokens; rounded down to whole blocks.
        block_size: KV block size in tokens (vLLM: 16).
        max_model_len: longest prompt + output of a request.
        admit_every_n_steps: admit waiting requests at most every n steps (1 = every step).
        kv_admission: when a waiting request's KV fits (module docstring): ``"blocks"``
            (vLLM), ``"reserve"`` (prompt + max_tokens allocated at admission) or ``"peak"``
            (S-LoRA's peak-future-memory check).
        null_block: keep one block out of use, as vLLM v1's block pool does (its "null
            block"): requests get ``num_blocks - 1`` blocks. The simulated server sets it; the
            paper's engine (the lab's profiles) has no such block.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_cache_tokens: int = 450_000
    block_size: int = 16
    max_model_len: int = 8192
    admit_every_n_steps: int = 1
    kv_admission: KvAdmission = "blocks"
    null_block: bool = False

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "max_model_len",
            "admit_every_n_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"engine config: {name} must be an integer >= 1, got {value!r}")
        if self.kv_cache_tokens < self.block_size * (2 if self.null_block else 1):
            raise ValueError(
                f"engine config: kv_cache_tokens must hold at least one block "
                f"({self.block_size} tokens), got {self.kv_cache_tokens!r}"
            )
        if self.kv_admission not in get_args(KvAdmission):
            raise ValueError(
                f"engine config: kv_admission must be one of "
                f"{', '.join(get_args(KvAdmission))}, got {self.kv_admission!r}"
            )

    @property
    def num_blocks(self) -> int:
        """KV blocks in the cache (what vLLM reports as ``num_gpu_blocks``)."""
        return self.kv_cache_tokens // self.block_size

    @classmethod
    def from_profile(
        cls,
        profile: Profile,
        *,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        kv_cache_tokens: int | None = None,
        max_model_len: int | None = None,
        block_size: int | None = None,
        kv_admission: KvAdmission | None = None,
    ) -> EngineConfig:
        """The profile's defaults, each overridable (``None`` keeps the profile's value)."""
        return cls(
            max_num_seqs=max_num_seqs if max_num_seqs is not None else profile.max_num_seqs,
            max_num_batched_tokens=(
                max_num_batched_tokens
                if max_num_batched_tokens is not None
                else profile.max_num_batched_tokens
            ),
            kv_cache_tokens=(
                kv_cache_tokens if kv_cache_tokens is not None else profile.kv_cache_tokens
            ),
            block_size=block_size if block_size is not None else profile.block_size,
            max_model_len=max_model_len if max_model_len is not None else profile.max_model_len,
            admit_every_n_steps=profile.admit_every_n_steps,
            kv_admission=kv_admission if kv_admission is not None else profile.kv_admission,
        )


@dataclass(slots=True)
class RequestOutput:
    """What one step did for one request (only requests with news appear in a step).

    Attributes:
        req_id: the request.
        new_tokens: tokens generated in this step (0 or 1).
        num_output_tokens: tokens generated so far, this step included.
        first_token: this step produced the request's first output token.
        finished: the request is done and has left the engine.
        finish_reason: ``"length"`` (hit max_tokens), ``"stop"`` (EOS: reached output_len
            before max_tokens) or ``"abort"``; ``None`` while running.
    """

    req_id: str
    new_tokens: int
    num_output_tokens: int
    first_token: bool
    finished: bool
    finish_reason: FinishReason | None


@dataclass(slots=True)
class StepResult:
    """The outcome of one :meth:`EngineCore.step`.

    Attributes:
        start: the ``now`` the step was planned at.
        duration: simulated step time (s); every output happens at ``start + duration``.
        outputs: one entry per request that generated a token or finished in this step.
        preempted: ids of requests preempted (sent back to the waiting queue) in this step.
        admitted: ids of requests moved from waiting to running in this step (new or resumed).
        num_scheduled_tokens: tokens in the step's forward pass (N of the cost model).
        num_prefill_tokens: part of them that were prefill (or recompute) tokens.
        num_decodes: requests that decoded one token.
        decode_context_tokens: sum of the context lengths of the decoding requests.
    """

    start: float
    duration: float
    outputs: list[RequestOutput]
    preempted: list[str]
    admitted: list[str]
    num_scheduled_tokens: int
    num_prefill_tokens: int
    num_decodes: int
    decode_context_tokens: int

    @property
    def end(self) -> float:
        """When the step's outputs happen: ``start + duration``."""
        return self.start + self.duration


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A snapshot of one request inside the engine (for tests, metrics and debugging)."""

    req_id: str
    status: Literal["waiting", "running"]
    prompt_tokens: int
    max_tokens: int
    output_len: int
    arrival: float
    num_computed_tokens: int
    num_output_tokens: int
    num_blocks: int
    num_preemptions: int
    first_scheduled: float | None


class _Request:
    __slots__ = (
        "arrival",
        "blocks",
        "first_scheduled",
        "max_tokens",
        "num_computed",
        "num_output",
        "num_tokens",
        "output_len",
        "preemptions",
        "prompt_tokens",
        "req_id",
        "reserve_blocks",
        "running",
    )

    def __init__(
        self,
        req_id: str,
        prompt_tokens: int,
        max_tokens: int,
        output_len: int,
        arrival: float,
        reserve_blocks: int,
    ) -> None:
        self.req_id = req_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.output_len = output_len
        self.arrival = arrival
        self.num_tokens = prompt_tokens  # prompt + generated so far
        self.num_computed = 0
        self.num_output = 0
        self.blocks = 0
        self.reserve_blocks = reserve_blocks
        self.running = False
        self.preemptions = 0
        self.first_scheduled: float | None = None


class EngineCore:
    """Continuous-batching engine in simulated time (see the module docstring).

    Not thread-safe and not async: the caller serialises calls. All methods are O(1) or
    O(batch) except :meth:`abort` of a waiting request (O(queue)).
    """

    def __init__(self, config: EngineConfig, cost: CostModel) -> None:
        """Create an idle engine with an empty KV cache."""
        self.config = config
        self.cost = cost
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._num_blocks = config.num_blocks - (1 if config.null_block else 0)  # usable
        self._free_blocks = self._num_blocks
        self._steps_since_admit = config.admit_every_n_steps
        self._num_preemptions = 0
        self._num_steps = 0
        self._generated_tokens = 0
        self._prefill_tokens = 0
        self._busy_time = 0.0

    # ------------------------------------------------------------------ requests

    def blocks_for(self, tokens: int) -> int:
        """KV blocks that hold ``tokens`` tokens (rounded up to whole blocks)."""
        return -(-tokens // self.config.block_size)

    def check_request(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request with these sizes can never run, or ``None`` if it can.

        Checks ``prompt_tokens >= 1``, ``max_tokens >= 1``, ``prompt + max_tokens <=
        max_model_len`` and that ``prompt + max_tokens`` fits the whole KV cache.
        """
        cfg = self.config
        if prompt_tokens < 1:
            return "the prompt must contain at least one token"
        if max_tokens < 1:
            return f"max_tokens must be at least 1, got {max_tokens}"
        total = prompt_tokens + max_tokens
        if total > cfg.max_model_len:
            return (
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, "
                f"you requested {total} tokens ({prompt_tokens} in the messages, {max_tokens} "
                f"in the completion). Please reduce the length of the messages or completion."
            )
        if self.blocks_for(total) > self._num_blocks:
            return (
                f"the request needs {total} tokens of KV cache but the cache holds only "
                f"{self._num_blocks * cfg.block_size} tokens"
            )
        return None

    def add_request(
        self, req_id: str, prompt_tokens: int, max_tokens: int, output_len: int, arrival: float
    ) -> None:
        """Append a request to the FCFS waiting queue.

        ``output_len`` is how many tokens it generates before EOS (1 <= output_len <=
        max_tokens); it finishes with ``"length"`` when ``output_len == max_tokens`` and with
        ``"stop"`` otherwise. Raises ``ValueError`` for a duplicate id or a request that can
        never run (see :meth:`check_request`).
        """
        if req_id in self._requests:
            raise ValueError(f"duplicate request id {req_id!r}")
        problem = self.check_request(prompt_tokens, max_tokens)
        if problem is not None:
            raise ValueError(problem)
        if not 1 <= output_len <= max_tokens:
            raise ValueError(f"output_len must be in [1, max_tokens], got {output_len}")
        reserve = (
            self.blocks_for(prompt_tokens + max_tokens)
            if self.config.kv_admission == "reserve"
            else 0
        )
        req = _Request(req_id, prompt_tokens, max_tokens, output_len, arrival, reserve)
        self._requests[req_id] = req
        self._waiting.append(req)

    def abort(self, req_id: str) -> bool:
        """Remove a waiting or running request and free its KV blocks.

        Returns ``False`` if the request is unknown (never added, finished or already aborted).
        """
        req = self._requests.pop(req_id, None)
        if req is None:
            return False
        if req.running:
            self._running.remove(req)
            self._free_blocks += req.blocks
            req.blocks = 0
            req.running = False
        else:
            self._waiting.remove(req)
        return True

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._requests)

    def request_info(self, req_id: str) -> RequestInfo | None:
        """A snapshot of a waiting or running request, ``None`` if unknown or finished."""
        req = self._requests.get(req_id)
        if req is None:
            return None
        return RequestInfo(
            req_id=req.req_id,
            status="running" if req.running else "waiting",
            prompt_tokens=req.prompt_tokens,
            max_tokens=req.max_tokens,
            output_len=req.output_len,
            arrival=req.arrival,
            num_computed_tokens=req.num_computed,
            num_output_tokens=req.num_output,
            num_blocks=req.blocks,
            num_preemptions=req.preemptions,
            first_scheduled=req.first_scheduled,
        )

    def waiting_ids(self) -> list[str]:
        """Ids of the waiting requests, head of the queue first."""
        return [r.req_id for r in self._waiting]

    def running_ids(self) -> list[str]:
        """Ids of the running requests in admission order (the last is preempted first)."""
        return [r.req_id for r in self._running]

    # ------------------------------------------------------------------ stats

    @property
    def num_running(self) -> int:
        """Requests in the running batch."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue (new and preempted)."""
        return len(self._waiting)

    @property
    def num_blocks(self) -> int:
        """KV blocks requests can use (vLLM's ``num_gpu_blocks`` less its null block)."""
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        """KV blocks not allocated to any request."""
        return self._free_blocks

    @property
    def kv_used_tokens(self) -> int:
        """Allocated KV capacity in tokens (allocated blocks x block size)."""
        return (self._num_blocks - self._free_blocks) * self.config.block_size

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks allocated, 0-1 (``vllm:kv_cache_usage_perc``)."""
        return (self._num_blocks - self._free_blocks) / self._num_blocks

    @property
    def num_preemptions(self) -> int:
        """Preemptions since the engine was created."""
        return self._num_preemptions

    @property
    def num_steps(self) -> int:
        """Steps that scheduled at least one token."""
        return self._num_steps

    @property
    def generated_tokens(self) -> int:
        """Output tokens generated since the engine was created."""
        return self._generated_tokens

    @property
    def prefill_tokens(self) -> int:
        """Prefill tokens computed (recomputation after preemption included)."""
        return self._prefill_tokens

    @property
    def busy_time(self) -> float:
        """Sum of step durations (simulated seconds the engine was busy)."""
        return self._busy_time

    # ------------------------------------------------------------------ the step

    def step(self, now: float) -> StepResult:
        """Plan and execute one engine step starting at ``now``.

        Returns the step's duration from the cost model and what it produced. A step with
        nothing to do (no unfinished request) has duration 0 and no outputs.
        """
        cfg = self.config
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens
        running = self._running
        waiting = self._waiting
        sched: list[tuple[_Request, int]] = []
        preempted: list[str] = []
        admitted: list[str] = []

        # 1. Running requests, in admission order.
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = req.num_tokens - req.num_computed
            if n > budget:
                n = budget
            need = (req.num_computed + n + bs - 1) // bs - req.blocks
            if need > 0:
                if need > self._free_blocks:
                    self_preempted = False
                    while need > self._free_blocks:
                        victim = running.pop()
                        self._preempt(victim)
                        preempted.append(victim.req_id)
                        if victim is req:
                            self_preempted = True
                            break
                    if self_preempted:
                        break
                req.blocks += need
                self._free_blocks -= need
            sched.append((req, n))
            budget -= n
            i += 1

        # 2. Waiting requests, FCFS, unless this step preempted or admission is gated.
        if (
            waiting
            and not preempted
            and (not running or self._steps_since_admit + 1 >= cfg.admit_every_n_steps)
        ):
            max_seqs = cfg.max_num_seqs
            reserve = cfg.kv_admission == "reserve"
            held = self._held_for_peak(sched) if cfg.kv_admission == "peak" else None
            capacity = self._num_blocks * bs
            while waiting and budget > 0 and len(running) < max_seqs:
                req = waiting[0]
                n = req.num_tokens - req.num_computed
                if n > budget:
                    n = budget
                need = req.reserve_blocks if reserve else (n + bs - 1) // bs
                if need > self._free_blocks:
                    break
                if held is not None:
                    entry = self._peak_entry(req, n)
                    held.append(entry)
                    if peak_tokens(held) > capacity and running:
                        break  # (an idle engine always admits its head: it fits the blocks)
                waiting.popleft()
                req.blocks = need
                self._free_blocks -= need
                req.running = True
                if req.first_scheduled is None:
                    req.first_scheduled = now
                running.append(req)
                admitted.append(req.req_id)
                sched.append((req, n))
                budget -= n
        if admitted:
            self._steps_since_admit = 0
        else:
            self._steps_since_admit += 1

        if not sched:
            if self._requests:  # pragma: no cover - the invariants above make this impossible
                raise RuntimeError("engine core made no progress with unfinished requests")
            return StepResult(now, 0.0, [], preempted, admitted, 0, 0, 0, 0)

        # 3. Execute: cost, then advance every scheduled request.
        num_tokens = 0
        prefill = 0
        decodes = 0
        ctx = 0
        outputs: list[RequestOutput] = []
        any_finished = False
        for req, n in sched:
            num_tokens += n
            if n == 1 and req.num_output > 0 and req.num_computed == req.num_tokens - 1:
                decodes += 1
                ctx += req.num_tokens
            else:
                prefill += n
            req.num_computed += n
            if req.num_computed == req.num_tokens:
                out = req.num_output + 1
                req.num_output = out
                req.num_tokens += 1
                if out >= req.output_len:
                    reason: FinishReason = "length" if out >= req.max_tokens else "stop"
                    outputs.append(RequestOutput(req.req_id, 1, out, out == 1, True, reason))
                    self._finish(req)
                    any_finished = True
                else:
                    outputs.append(RequestOutput(req.req_id, 1, out, out == 1, False, None))
        if any_finished:
            self._running = [r for r in running if r.running]
        duration = self.cost.step_time(num_tokens, ctx)
        self._num_steps += 1
        self._generated_tokens += len(outputs)
        self._prefill_tokens += prefill
        self._busy_time += duration
        return StepResult(
            now, duration, outputs, preempted, admitted, num_tokens, prefill, decodes, ctx
        )

    def _peak_entry(self, req: _Request, n: int) -> tuple[int, int]:
        """``(run, left)`` of a request for the peak check, once ``n`` more tokens are computed.

        ``run``: its tokens, padded by ``block_size - 1`` (block rounding); ``left``: output
        tokens to come plus the steps its prefill still needs after this one (it does not grow
        meanwhile, so the padding keeps the estimate an upper bound).
        """
        cfg = self.config
        rest = req.num_tokens - req.num_computed - n
        steps = -(-rest // cfg.max_num_batched_tokens) if rest > 0 else 0
        return req.num_tokens + cfg.block_size - 1, req.max_tokens - req.num_output + steps

    def _held_for_peak(self, sched: list[tuple[_Request, int]]) -> list[tuple[int, int]]:
        """Peak-check entries of the running requests, as scheduled in this step.

        ``sched`` holds the first running requests in order (a step whose token budget ran
        out leaves the rest unscheduled: they count with ``n = 0``).
        """
        entries = [self._peak_entry(req, n) for req, n in sched]
        entries.extend(self._peak_entry(req, 0) for req in self._running[len(sched) :])
        return entries

    def _preempt(self, req: _Request) -> None:
        self._free_blocks += req.blocks
        req.blocks = 0
        req.num_computed = 0
        req.running = False
        req.preemptions += 1
        self._num_preemptions += 1
        self._waiting.appendleft(req)

    def _finish(self, req: _Request) -> None:
        self._free_blocks += req.blocks
        req.blocks = 0
        req.running = False
        del self._requests[req.req_id]

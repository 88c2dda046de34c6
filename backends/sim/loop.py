"""The asyncio shell around :class:`~backends.sim.engine.EngineCore`.

One task runs the engine: while there is work it calls ``core.step()``, sleeps until the step's
planned end (``duration / speed`` after the previous planned end, against the loop's monotonic
clock, so steps do not drift: a late wake-up shortens the next sleep) and then hands each output
to its request's :class:`RequestStream`. Each stream has exactly one consumer, woken through one
``asyncio.Event`` (vLLM's ``RequestOutputCollector`` pattern), never polled. With nothing to do
the task waits on an event set by :meth:`EngineLoop.submit`.

``speed`` scales simulated time: 2.0 runs twice as fast as the modelled GPU, 0.5 in slow motion,
and 0 disables delays entirely (steps take no wall time; tokens come as fast as the process can
write them), for benchmarks of the layers in front of the simulator.

Lag is measured per step as how late the step's outputs are delivered relative to the plan;
:class:`LoopStats` aggregates it. When the loop falls more than ``max_catch_up`` seconds behind
(a blocked event loop, an overloaded CPU) it re-anchors the plan instead of bursting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from backends.sim.engine import EngineCore, RequestOutput, StepResult
from backends.sim.metrics import SimMetrics

__all__ = ["EngineDead", "EngineLoop", "LoopStats", "RequestStream"]

log = logging.getLogger(__name__)


class EngineDead(Exception):
    """The engine loop failed or shut down; the request cannot complete."""


class RequestStream:
    """Outputs of one request, handed from the engine loop to its single consumer."""

    __slots__ = (
        "_error",
        "_event",
        "_items",
        "arrival",
        "first_token_at",
        "last_token_at",
        "prompt_tokens",
        "queued",
        "req_id",
    )

    def __init__(self, req_id: str, prompt_tokens: int, arrival: float) -> None:
        self.req_id = req_id
        self.prompt_tokens = prompt_tokens
        self.arrival = arrival
        self.queued = True
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._items: list[RequestOutput] = []
        self._event = asyncio.Event()
        self._error: EngineDead | None = None

    def put(self, output: RequestOutput) -> None:
        """Engine side: deliver one output and wake the consumer."""
        self._items.append(output)
        self._event.set()

    def fail(self, error: EngineDead) -> None:
        """Engine side: end the stream with an error (delivered after pending outputs)."""
        self._error = error
        self._event.set()

    async def get(self) -> list[RequestOutput]:
        """Consumer side: wait for and take every output delivered since the last call.

        Raises :class:`EngineDead` once the pending outputs are consumed after a failure.
        """
        while not self._items:
            if self._error is not None:
                raise self._error
            self._event.clear()
            await self._event.wait()
        items, self._items = self._items, []
        return items


@dataclass(frozen=True, slots=True)
class LoopStats:
    """Timing of the engine loop since the last reset.

    Attributes:
        steps: steps executed.
        sim_time: simulated seconds of those steps (sum of durations).
        planned_wall: wall seconds they should take (``sim_time / speed``).
        busy_wall: wall seconds from each busy period's start to its last delivery.
        lag_mean: mean per-step delivery lag (s).
        lag_max: worst per-step delivery lag (s).
        reanchors: times the plan was reset because the loop fell too far behind.
        tokens: output tokens delivered.
    """

    steps: int
    sim_time: float
    planned_wall: float
    busy_wall: float
    lag_mean: float
    lag_max: float
    reanchors: int
    tokens: int

    @property
    def lag_ratio(self) -> float:
        """Relative slowdown against the plan: ``busy_wall / planned_wall - 1`` (0 = on time)."""
        if self.planned_wall <= 0:
            return 0.0
        return max(0.0, self.busy_wall / self.planned_wall - 1.0)


class EngineLoop:
    """Runs an :class:`EngineCore` in (scaled) real time; see the module docstring."""

    def __init__(
        self,
        core: EngineCore,
        *,
        speed: float = 1.0,
        metrics: SimMetrics | None = None,
        max_catch_up: float = 0.5,
    ) -> None:
        if speed < 0:
            raise ValueError(f"speed must be >= 0, got {speed}")
        self.core = core
        self.speed = speed
        self.metrics = metrics
        self.max_catch_up = max_catch_up
        self._streams: dict[str, RequestStream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dead: EngineDead | None = None
        self._sim_now = 0.0
        self._period_start: float | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._steps = 0
        self._sim_time = 0.0
        self._busy_wall = 0.0
        self._lag_sum = 0.0
        self._lag_max = 0.0
        self._reanchors = 0
        self._tokens = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the loop task (call from a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        """Stop the loop task and fail every open stream with :class:`EngineDead`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.fail_all(EngineDead("the server is shutting down"))

    def fail_all(self, error: EngineDead) -> None:
        """Fail every open stream and drop its request from the engine."""
        self._dead = error
        for req_id, stream in list(self._streams.items()):
            self.core.abort(req_id)
            stream.fail(error)
        self._streams.clear()

    # ------------------------------------------------------------------ requests

    @property
    def dead(self) -> EngineDead | None:
        """The error that stopped the engine, ``None`` while it runs."""
        return self._dead

    def submit(
        self, req_id: str, prompt_tokens: int, max_tokens: int, output_len: int
    ) -> RequestStream:
        """Queue a request in the engine and return its stream.

        Raises ``ValueError`` (see :meth:`EngineCore.add_request`) or :class:`EngineDead`.
        """
        if self._dead is not None:
            raise self._dead
        loop = asyncio.get_running_loop()
        self.core.add_request(req_id, prompt_tokens, max_tokens, output_len, self._sim_now)
        stream = RequestStream(req_id, prompt_tokens, loop.time())
        self._streams[req_id] = stream
        self._wake.set()
        return stream

    def abort(self, req_id: str) -> bool:
        """Abort a request (client gone): it leaves the batch now and its KV is freed."""
        stream = self._streams.pop(req_id, None)
        aborted = self.core.abort(req_id)
        if aborted and self.metrics is not None:
            self.metrics.on_finished("abort")
        return aborted or stream is not None

    # ------------------------------------------------------------------ stats

    def stats(self) -> LoopStats:
        """Timing since the last :meth:`reset_stats`."""
        steps = self._steps
        busy = self._busy_wall
        if self._period_start is not None:  # include the busy period in progress
            busy += asyncio.get_running_loop().time() - self._period_start
        return LoopStats(
            steps=steps,
            sim_time=self._sim_time,
            planned_wall=self._sim_time / self.speed if self.speed > 0 else 0.0,
            busy_wall=busy,
            lag_mean=self._lag_sum / steps if steps else 0.0,
            lag_max=self._lag_max,
            reanchors=self._reanchors,
            tokens=self._tokens,
        )

    def reset_stats(self) -> None:
        """Zero the timing counters (benchmarks call it after warm-up).

        A busy period in progress is measured from now on.
        """
        self._reset_counters()
        if self._period_start is not None:
            self._period_start = asyncio.get_running_loop().time()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the core: fail loudly, not silently hang
            log.exception("simulated engine failed")
            self.fail_all(EngineDead(f"engine failure: {exc!r}"))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        speed = self.speed
        while True:
            if not core.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            self._period_start = loop.time()
            deadline = self._period_start
            while core.has_unfinished():
                result = core.step(self._sim_now)
                self._sim_now += result.duration
                self._sim_time += result.duration
                if speed > 0:
                    deadline += result.duration / speed
                    delay = deadline - loop.time()
                    await asyncio.sleep(delay if delay > 0 else 0)
                    now = loop.time()
                    lag = now - deadline
                    if lag > self.max_catch_up:
                        self._reanchors += 1
                        self._busy_wall += now - self._period_start
                        log.debug("engine loop %.3fs behind its plan; re-anchoring", lag)
                        self._period_start = deadline = now
                else:
                    await asyncio.sleep(0)
                    now = loop.time()
                    lag = 0.0
                if lag > 0:
                    self._lag_sum += lag
                    if lag > self._lag_max:
                        self._lag_max = lag
                self._steps += 1
                self._deliver(result, now)
            self._busy_wall += loop.time() - self._period_start
            self._period_start = None

    def _deliver(self, result: StepResult, now: float) -> None:
        streams = self._streams
        metrics = self.metrics
        if metrics is not None:
            if result.preempted:
                metrics.preemptions.inc(len(result.preempted))
            if result.outputs:
                metrics.generation_tokens.inc(len(result.outputs))
        if metrics is not None and result.admitted:
            for req_id in result.admitted:
                st = streams.get(req_id)
                if st is not None and st.queued:
                    st.queued = False
                    # Admission happened when the step started: now minus its wall duration.
                    start = now - (result.duration / self.speed if self.speed > 0 else 0.0)
                    metrics.queue_time.observe(max(0.0, start - st.arrival))
        self._tokens += len(result.outputs)
        for out in result.outputs:
            stream = streams.get(out.req_id)
            if stream is None:
                continue  # aborted while the step ran
            if metrics is not None:
                if out.first_token:
                    metrics.ttft.observe(now - stream.arrival)
                    metrics.prompt_tokens.inc(stream.prompt_tokens)
                elif stream.last_token_at is not None:
                    metrics.itl.observe(now - stream.last_token_at)
                if out.finished:
                    metrics.e2e.observe(now - stream.arrival)
                    if stream.first_token_at is not None and out.num_output_tokens > 1:
                        # vLLM: decode time over output tokens after the first
                        decode = now - stream.first_token_at
                        metrics.tpot.observe(decode / (out.num_output_tokens - 1))
                    metrics.on_finished(out.finish_reason or "stop")
            if out.first_token:
                stream.first_token_at = now
            stream.last_token_at = now
            if out.finished:
                del streams[out.req_id]
            stream.put(out)

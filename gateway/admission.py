"""Admission control: is there room on a backend for one more request?

The gateway, not the backend, holds the queue: anything sent to vLLM beyond what fits in its
running batch would wait in vLLM's own FCFS queue and fairness would be lost. Per backend we track
in-flight sequences and their KV demand and admit while both fit:

* ``max_num_seqs``: concurrent sequences (vLLM's knob of the same name);
* ``max_kv_tokens``: the KV budget, checked in one of three ways (``kv_admission``):

  - ``"predict"`` (default): what vLLM itself does, planned ahead. vLLM does not reserve: it
    allocates KV blocks as tokens are generated and preempts when it runs out. The gateway
    knows each running request's current KV use exactly (prompt + tokens streamed so far,
    :meth:`AdmissionController.note_output`) and predicts only the rest of its output
    (``expect``: a high quantile of the history of its tenant, model and endpoint, from
    :class:`gateway.scheduler.predictor.OutputPredictor`, at most its ``max_tokens``; a request
    that outruns its prediction is expected to go on for a quarter of what it has generated,
    at least a block). Admission runs the peak check below on those numbers, plus a block of
    rounding per request, against ``max_kv_tokens * kv_scale``; engine feedback
    (:func:`adapt_kv_scale`) moves ``kv_scale`` down when vLLM queues or preempts and back up
    to the whole cache once it does not. A request without ``max_tokens`` no
    longer books the rest of the context: on a 128k-context model the gateway runs as many
    requests as vLLM alone would.
  - ``"reserve"``: the sum over in-flight requests of ``prompt_tokens + reserved_output`` must
    fit. Strict (vLLM never preempts) but a request that stops early held its whole
    reservation, and one without ``max_tokens`` books the rest of the context.
  - ``"peak"``: the peak-future-memory check of S-LoRA, the VTC paper's engine
    (``_can_add_new_req`` in the artifact's ``vtc_req_queue.py``). Each in-flight request holds
    ``run = prompt + generated`` tokens and has ``left = reserved_output - generated`` to come;
    sorted by ``left`` descending, request i (1-based) finishes when ``sum(run[:i]) + left[i]*i``
    tokens are held (every request growing one token per step); the largest of these, candidate
    included, must fit. Still an upper bound when no request outgrows its reservation, but it
    packs far more requests when lengths vary. It needs to know the tokens generated so far:
    :meth:`AdmissionController.note_output` (O(1), per output token).

``reserved_output`` is the request's ``max_tokens`` (or a prediction), capped by what the context
leaves after the prompt. A request whose ``prompt + reserved_output`` exceeds every backend's
``max_kv_tokens`` can never run and is rejected up front (:meth:`AdmissionController.can_ever_fit`),
in both modes.

:attr:`BackendSlots.reserved_tokens` (exported as ``vtc_backend_reserved_tokens``) is the KV
demand that admission compares with ``max_kv_tokens``: the sum of reservations (``"reserve"``) or
the current peak estimate of the in-flight requests (``"peak"``).

Cost in ``"peak"`` mode: :meth:`AdmissionController.note_output` is O(1); :meth:`BackendSlots.fits`
is one pass over the n in-flight requests, after re-sorting them when any has progressed since
the last call (Python's sort is close to linear on the order kept from that call; O(n log n) at
worst). Precomputed prefix/suffix maxima would make a repeated check O(log n), but in the live
gateway almost every check follows news (a token, a release, the previous admission), and
building them costs more than the pass.

Pure and synchronous, like the scheduler: the live dispatcher and the lab's simulator share it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Literal, get_args

#: How the KV budget is checked: current use plus predicted output (default), sum of
#: reservations, or S-LoRA's peak-future-memory estimate over the reservations.
KvAdmission = Literal["predict", "reserve", "peak"]
KV_ADMISSION_MODES: tuple[str, ...] = get_args(KvAdmission)

_LEFT = attrgetter("left")


def planned_output(tokens: int, prompt: int, expect: int | None) -> int:
    """The output a request of ``tokens`` (``prompt`` + reserved output) is planned for: the
    prediction ``expect``, at most the reservation (None: the whole reservation)."""
    out = tokens - prompt
    return out if expect is None or expect > out else expect


#: Output tokens at least still expected of a request that outran its prediction.
OVERRUN_MIN = 16


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds on a backend.

    ``tokens`` is ``prompt + reserved output`` (what ``"reserve"`` mode books); ``prompt`` the
    part of it held from admission on; ``expect`` the output ``"predict"`` mode plans for (at
    most ``tokens - prompt``). ``generated``, ``run`` and ``left`` follow the output as
    :meth:`AdmissionController.note_output` reports it (``"peak"`` and ``"predict"`` read them).
    """

    backend: str
    tokens: int
    prompt: int = 0
    generated: int = field(default=0, compare=False)
    run: int = field(default=0, compare=False, repr=False)
    left: int = field(default=0, compare=False, repr=False)
    peak: bool = field(default=False, compare=False, repr=False)  # held by a "peak" backend
    expect: int | None = field(default=None, compare=False)  # None: the whole reservation
    #: "predict" mode: ``left`` follows ``expect``, not the reservation
    predict: bool = field(default=False, compare=False, repr=False)
    #: its booking in the backend's rate budget (a quota backend), else None
    quota: QuotaEntry | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.run = self.prompt + self.generated
        self.left = self.remaining()

    def remaining(self) -> int:
        """Output still to come: up to the reservation, or (``"predict"``) the prediction,
        and for a request that outran it a quarter of what it generated (a block at least),
        never past the reservation."""
        cap = self.tokens - self.run
        if not self.predict or self.expect is None:
            return cap if cap > 0 else 0
        g = self.generated
        left = self.expect - g
        if left <= 0:
            left = max(OVERRUN_MIN, g >> 2)
        return left if left < cap else (cap if cap > 0 else 0)


@dataclass(slots=True)
class BackendSlots:
    """Capacity and current load of one backend."""

    name: str
    models: frozenset[str]
    max_num_seqs: int
    max_kv_tokens: int
    healthy: bool = True
    in_flight: int = 0
    #: sum of ``prompt + reserved output`` over in-flight requests (both modes)
    booked_tokens: int = 0
    # requests admitted over the backend's life (for metrics)
    admitted_total: int = field(default=0)
    kv_admission: KvAdmission = "reserve"  # the config's default is "predict"
    #: sequence cap learned from the backend's own queue (None: ``max_num_seqs``)
    seq_cap: int | None = None
    #: "predict" mode: the budget is ``max_kv_tokens * kv_scale`` (engine feedback moves it)
    kv_scale: float = 1.0
    #: the backend's KV block size (a request's use is rounded up to whole blocks)
    block_size: int = 16
    #: a rate budget (tokens and requests per minute: a hosted API) checked besides the
    #: sequence and KV limits; None: none
    quota: Quota | None = None
    # "peak" mode: the in-flight reservations in (nearly) sorted order of `left`, descending;
    # _dirty: something changed since the last sort; _peak: cached reserved_tokens (or None)
    _held: list[Reservation] = field(default_factory=list, repr=False)
    _dirty: bool = field(default=False, repr=False)
    _peak: int | None = field(default=None, repr=False)

    @property
    def cap(self) -> int:
        """Sequences admitted at most now: the learned cap, else ``max_num_seqs``."""
        return self.max_num_seqs if self.seq_cap is None else self.seq_cap

    @property
    def kv_budget(self) -> int:
        """Tokens admission may plan for: ``max_kv_tokens`` (``"predict"``: times
        ``kv_scale``)."""
        if self.kv_admission == "predict":
            return int(self.max_kv_tokens * self.kv_scale)
        return self.max_kv_tokens

    @property
    def reserved_tokens(self) -> int:
        """KV demand compared with the budget: booked tokens (``"reserve"``) or the peak
        estimate of the in-flight requests (``"peak"``, ``"predict"``: with a block of rounding
        per request)."""
        if self.kv_admission == "reserve":
            return self.booked_tokens
        if self._peak is None:
            self._peak = self.peak_with(0, 0)  # a (0, 0) candidate adds nothing to the peak
        if self.kv_admission == "predict":
            return self._peak + self.in_flight * self.block_size
        return self._peak

    def fits(self, tokens: int, prompt: int = 0, expect: int | None = None, share: int = 1) -> bool:
        """Room for a request of ``tokens`` (= ``prompt`` + reserved output) right now?
        ``expect``: the output ``"predict"`` mode plans for (None: the reservation).
        ``share`` > 1: only ``1/share`` of the sequences and KV budget count as this caller's
        (a cluster replica cut off from the shared ledger), and a request alone always fits."""
        cap = self.cap if share == 1 else max(1, self.cap // share)
        if not self.healthy or self.in_flight >= cap:
            return False
        quota = self.quota
        if quota is not None and not quota.fits(prompt + planned_output(tokens, prompt, expect)):
            return False
        if share > 1 and not self.in_flight:
            return True
        mode = self.kv_admission
        if mode == "reserve":
            return self.booked_tokens + tokens <= self.max_kv_tokens // share
        if mode == "predict":
            pad = (self.in_flight + 1) * self.block_size
            left = planned_output(tokens, prompt, expect)
            return self.peak_with(prompt, left) + pad <= self.kv_budget // share
        return self.peak_with(prompt, tokens - prompt) <= self.max_kv_tokens // share

    def peak_with(self, run: int, left: int) -> int:
        """Peak estimate of the in-flight requests plus one holding ``run`` tokens with ``left``
        to come: one pass over the requests in order of ``left`` (re-sorted first if anything
        changed; the sort is near-linear on the order kept from the last call)."""
        held = self._held
        if self._dirty:
            held.sort(key=_LEFT, reverse=True)
            self._dirty = False
        cum = 0
        peak = 0
        i = 0
        placed = False
        for r in held:
            r_left = r.left
            if not placed and r_left < left:
                # the candidate goes after every request with at least as much left (ties:
                # any order among equal lefts gives the same maximum)
                i += 1
                cum += run
                term = cum + left * i
                if term > peak:
                    peak = term
                placed = True
            i += 1
            cum += r.run
            term = cum + r_left * i
            if term > peak:
                peak = term
        if not placed:
            term = cum + run + left * (i + 1)
            if term > peak:
                peak = term
        return peak

    @property
    def load(self) -> float:
        """Fraction of the tighter of the two limits in use (for least-loaded placement)."""
        return max(self.in_flight / self.max_num_seqs, self.reserved_tokens / self.kv_budget)


class AdmissionController:
    """Tracks reservations on a set of backends and places requests (least loaded first)."""

    def __init__(self, backends: Iterable[BackendSlots] = ()) -> None:
        self._backends: dict[str, BackendSlots] = {}
        for b in backends:
            self.add(b)

    def add(self, backend: BackendSlots) -> None:
        if backend.max_num_seqs < 1 or backend.max_kv_tokens < 1:
            raise ValueError(f"backend {backend.name!r}: capacity limits must be >= 1")
        if backend.kv_admission not in KV_ADMISSION_MODES:
            raise ValueError(
                f"backend {backend.name!r}: kv_admission must be one of "
                f"{', '.join(KV_ADMISSION_MODES)}, got {backend.kv_admission!r}"
            )
        self._backends[backend.name] = backend

    def get(self, name: str) -> BackendSlots:
        return self._backends[name]

    def backends(self) -> Iterable[BackendSlots]:
        return self._backends.values()

    def serving(self, model: str) -> list[BackendSlots]:
        return [b for b in self._backends.values() if model in b.models]

    def can_ever_fit(self, model: str, tokens: int) -> bool:
        return any(tokens <= b.max_kv_tokens for b in self.serving(model))

    def place(
        self,
        model: str,
        tokens: int,
        exclude: Iterable[str] = (),
        prompt: int = 0,
        expect: int | None = None,
        share: int = 1,
    ) -> BackendSlots | None:
        """The least-loaded healthy backend serving ``model`` with room for ``tokens``, of
        which ``prompt`` is prompt (the rest output to come, of which ``"predict"`` mode plans
        for ``expect``; ``"reserve"`` mode books it all); ``share``: as for
        :meth:`BackendSlots.fits`."""
        skip = set(exclude)
        best: BackendSlots | None = None
        for b in self._backends.values():
            if (
                model in b.models
                and b.name not in skip
                and b.fits(tokens, prompt, expect, share)
                and (best is None or b.load < best.load)
            ):
                best = b
        return best

    def reserve(
        self, backend: BackendSlots, tokens: int, prompt: int = 0, expect: int | None = None
    ) -> Reservation:
        mode = backend.kv_admission
        predict = mode == "predict"
        if predict and expect is None:
            expect = tokens - prompt
        reservation = Reservation(
            backend.name, tokens, prompt, expect=expect if predict else None, predict=predict
        )
        backend.in_flight += 1
        backend.booked_tokens += tokens
        backend.admitted_total += 1
        if backend.quota is not None:
            reservation.quota = backend.quota.book(prompt + planned_output(tokens, prompt, expect))
        if mode != "reserve":
            reservation.peak = True
            backend._held.append(reservation)
            backend._dirty = True
            backend._peak = None
        return reservation

    def note_output(self, reservation: Reservation, n: int) -> None:
        """``n`` more output tokens of ``reservation``'s request have been generated. O(1)."""
        g = reservation.generated + n
        reservation.generated = g
        run = reservation.run + n
        reservation.run = run
        if reservation.predict:
            reservation.left = reservation.remaining()
        else:
            left = reservation.left - n
            reservation.left = left if left > 0 else 0
        entry = reservation.quota
        if reservation.peak or entry is not None:
            b = self._backends.get(reservation.backend)
            if b is not None:
                b._dirty = True  # "peak" and "predict" re-sort on progress
                b._peak = None
                if entry is not None and run > entry.tokens and b.quota is not None:
                    b.quota.correct(entry, run)

    def adjust_prompt(self, reservation: Reservation, prompt: int) -> int:
        """The backend counted the prompt as ``prompt`` tokens where the gateway estimated
        ``reservation.prompt`` (its tokenizer may differ from the model's): correct the
        booking so admission tracks what the backend really holds. Returns the change."""
        delta = prompt - reservation.prompt
        if delta:
            reservation.prompt = prompt
            reservation.tokens += delta
            reservation.run += delta
            if reservation.predict:
                reservation.left = reservation.remaining()
            b = self._backends.get(reservation.backend)
            if b is not None:
                b.booked_tokens += delta
                b._dirty = True
                b._peak = None
        return delta

    def release(self, reservation: Reservation) -> None:
        b = self._backends.get(reservation.backend)
        if b is None:  # backend removed by a reload while the request ran
            return
        if b.in_flight < 1 or b.booked_tokens < reservation.tokens:
            # checked before touching the counts: a refused release leaves them as they were
            raise AssertionError(f"backend {b.name!r}: released more than was reserved")
        if reservation.peak or b.kv_admission != "reserve":
            held = b._held
            for i, r in enumerate(held):
                if r is reservation:
                    del held[i]
                    break
            else:
                raise AssertionError(f"backend {b.name!r}: released more than was reserved")
            b._peak = None  # removal keeps the order sorted
        b.in_flight -= 1
        b.booked_tokens -= reservation.tokens
        if reservation.quota is not None and b.quota is not None:
            b.quota.correct(reservation.quota, reservation.run)  # what it really cost

    def void(self, reservation: Reservation) -> None:
        """The backend refused the request before running it (a provider's 429): its booking
        in the backend's rate budget counts nothing. Call before :meth:`release`."""
        reservation.run = reservation.prompt = 0
        entry = reservation.quota
        b = self._backends.get(reservation.backend)
        if entry is not None and b is not None and b.quota is not None:
            b.quota.drop(entry)

    def in_flight(self) -> int:
        return sum(b.in_flight for b in self._backends.values())


def adapt_seq_cap(slots: BackendSlots, waiting: int, running: int, gateway_queued: int) -> bool:
    """One step of admission feedback from a backend's own queue; returns True when the cap
    grew (the caller should dispatch). Pure; called every health interval.

    * The backend reports waiting requests: the gateway admitted more than it runs at once
      (its real limit is below ``max_num_seqs``, or KV is tighter than the budget): cap the
      sequences at what it runs, so the fair queue, not the backend's FCFS queue, holds the rest.
    * Nothing waits in the backend, the cap binds and the gateway's queue waits for this
      backend: grow the cap by 10 % (at least 1) back towards ``max_num_seqs``.
    """
    cap = slots.cap
    new = cap
    if waiting > 0:
        new = max(1, min(cap, running))
    elif gateway_queued > 0 and slots.in_flight >= cap:
        new = min(slots.max_num_seqs, cap + max(1, cap // 10))
    slots.seq_cap = None if new >= slots.max_num_seqs else new
    return new > cap


#: Bounds of ``BackendSlots.kv_scale``: feedback never plans for less than half the cache, nor
#: for more than all of it (growing past it was measured in the lab to trade preemptions for
#: nothing: the peak estimate already admits what the cache holds).
KV_SCALE_MIN = 0.5
KV_SCALE_MAX = 1.0


def adapt_kv_scale(
    slots: BackendSlots,
    *,
    waiting: float,
    preempted: float,
    kv_usage: float | None,
    gateway_queued: int,
    running: float = 0.0,
) -> bool:
    """One step of ``"predict"`` admission feedback from the engine's own view; returns True
    when the budget grew while the gateway's queue waits (the caller should dispatch). Pure;
    called every feedback interval.

    * The engine preempted requests since the last step (``preempted`` > 0) or holds a queue
      that requests just sent do not explain (``waiting`` above 1 and above a quarter of
      ``running``): the gateway admitted more than fits; shrink the budget by 15 % (to half
      the cache at most).
    * Otherwise, unless its KV cache is nearly full (``kv_usage`` >= 0.95), recover by 5 % a
      step towards the whole cache.
    """
    if slots.kv_admission != "predict":
        return False
    scale = slots.kv_scale
    new = scale
    if preempted > 0 or waiting > max(1.0, 0.25 * running):
        new = max(KV_SCALE_MIN, scale * 0.85)
    elif scale < KV_SCALE_MAX and (kv_usage is None or kv_usage < 0.95):
        new = min(KV_SCALE_MAX, scale * 1.05)
    slots.kv_scale = new
    if new != scale:
        slots._peak = None
    return new > scale and gateway_queued > 0


@dataclass(slots=True)
class QuotaEntry:
    """One request's share of a :class:`Quota` window: its tokens, counted at ``t``."""

    t: float
    tokens: int


class Quota:
    """A rate budget instead of batch slots: ``tpm`` tokens and ``rpm`` requests per
    ``window_s`` (a hosted API's tokens and requests per minute), over a sliding window.

    A request is booked at dispatch with the tokens it is expected to cost (prompt + predicted
    output) and counted at that moment, as providers count it; the booking follows the real
    count as the output streams (never below what has been generated) and becomes the real
    count when the request ends (nothing, if the provider refused it). Admission sends a
    request while the window ending now has room for it (a request larger than the whole
    budget goes into an empty window, so it is not refused forever). The budget backs off:
    after a provider's 429 nothing is sent until its ``Retry-After`` has passed.

    Either limit may be unknown (None): a backend that answered 429 without saying its limits
    gets a quota of neither, which only backs off.

    Pure: time comes from ``clock``. Cost: amortised O(1) per booking and check.
    """

    __slots__ = ("_entries", "clock", "paused_until", "rpm", "tpm", "used", "window_s")

    def __init__(
        self,
        tpm: int | None,
        rpm: int | None,
        window_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.tpm = tpm
        self.rpm = rpm
        self.window_s = window_s
        self.clock = clock
        self._entries: deque[QuotaEntry] = deque()
        self.used = 0  # tokens booked in the window
        self.paused_until = 0.0

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        entries = self._entries
        while entries and entries[0].t <= horizon:
            self.used -= entries.popleft().tokens

    def fits(self, tokens: int) -> bool:
        now = self.clock()
        if now < self.paused_until:
            return False
        self._prune(now)
        if self.rpm is not None and len(self._entries) >= self.rpm:
            return False
        return self.tpm is None or not self._entries or self.used + tokens <= self.tpm

    def book(self, tokens: int) -> QuotaEntry:
        entry = QuotaEntry(self.clock(), tokens)
        self._entries.append(entry)
        self.used += tokens
        return entry

    def correct(self, entry: QuotaEntry, tokens: int) -> None:
        """``entry`` really costs ``tokens`` (the window forgets it when it leaves)."""
        now = self.clock()
        self._prune(now)  # an entry that left the window no longer counts in ``used``
        if self._entries and entry.t > now - self.window_s:
            self.used += tokens - entry.tokens
        entry.tokens = tokens

    def drop(self, entry: QuotaEntry) -> None:
        """``entry`` never reached the provider (it refused it): it counts nothing, neither
        tokens nor a request. O(n) in the window's bookings; refusals are rare."""
        try:
            self._entries.remove(entry)
        except ValueError:
            entry.tokens = 0
            return
        self.used -= entry.tokens
        entry.tokens = 0

    def back_off(self, seconds: float) -> None:
        """The provider refused a request: send nothing for ``seconds``."""
        self.paused_until = max(self.paused_until, self.clock() + max(0.0, seconds))

    def learn(self, tpm: int | None, rpm: int | None) -> None:
        """Limits the provider announced (``x-ratelimit-limit-*``) replace unknown ones."""
        if tpm is not None and tpm > 0:
            self.tpm = tpm
        if rpm is not None and rpm > 0:
            self.rpm = rpm

    def next_change(self) -> float | None:
        """Seconds until the budget can grow (a pause ends, the oldest booking leaves the
        window); None while nothing is booked or paused."""
        now = self.clock()
        self._prune(now)
        waits = []
        if self.paused_until > now:
            waits.append(self.paused_until - now)
        if self._entries:
            waits.append(self._entries[0].t + self.window_s - now)
        return max(0.0, min(waits)) if waits else None

    @property
    def requests(self) -> int:
        return len(self._entries)

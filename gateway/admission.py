"""Admission control: is there room on a backend for one more request?

The gateway, not the backend, holds the queue: anything sent to vLLM beyond what fits in its
running batch would wait in vLLM's own FCFS queue and fairness would be lost. Per backend we track
in-flight sequences and reserved KV tokens and admit while both fit:

* ``max_num_seqs``: concurrent sequences (vLLM's knob of the same name);
* ``max_kv_tokens``: the sum over in-flight requests of ``prompt_tokens + reserved_output``.

``reserved_output`` is the request's ``max_tokens`` (or a prediction), capped by what the context
leaves after the prompt. A request whose reservation exceeds every backend's ``max_kv_tokens``
can never run and is rejected up front (:meth:`AdmissionController.can_ever_fit`).

Pure and synchronous, like the scheduler: the live dispatcher and the lab's simulator share it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class BackendSlots:
    """Capacity and current load of one backend."""

    name: str
    models: frozenset[str]
    max_num_seqs: int
    max_kv_tokens: int
    healthy: bool = True
    in_flight: int = 0
    reserved_tokens: int = 0
    # requests admitted over the backend's life (for metrics)
    admitted_total: int = field(default=0)

    def fits(self, tokens: int) -> bool:
        return (
            self.healthy
            and self.in_flight < self.max_num_seqs
            and self.reserved_tokens + tokens <= self.max_kv_tokens
        )

    @property
    def load(self) -> float:
        """Fraction of the tighter of the two limits in use (for least-loaded placement)."""
        return max(self.in_flight / self.max_num_seqs, self.reserved_tokens / self.max_kv_tokens)


@dataclass(slots=True, frozen=True)
class Reservation:
    backend: str
    tokens: int


class AdmissionController:
    """Tracks reservations on a set of backends and places requests (least loaded first)."""

    def __init__(self, backends: Iterable[BackendSlots] = ()) -> None:
        self._backends: dict[str, BackendSlots] = {}
        for b in backends:
            self.add(b)

    def add(self, backend: BackendSlots) -> None:
        if backend.max_num_seqs < 1 or backend.max_kv_tokens < 1:
            raise ValueError(f"backend {backend.name!r}: capacity limits must be >= 1")
        self._backends[backend.name] = backend

    def get(self, name: str) -> BackendSlots:
        return self._backends[name]

    def backends(self) -> Iterable[BackendSlots]:
        return self._backends.values()

    def serving(self, model: str) -> list[BackendSlots]:
        return [b for b in self._backends.values() if model in b.models]

    def can_ever_fit(self, model: str, tokens: int) -> bool:
        return any(tokens <= b.max_kv_tokens for b in self.serving(model))

    def place(self, model: str, tokens: int, exclude: Iterable[str] = ()) -> BackendSlots | None:
        """The least-loaded healthy backend serving ``model`` with room for ``tokens``."""
        skip = set(exclude)
        best: BackendSlots | None = None
        for b in self._backends.values():
            if (
                model in b.models
                and b.name not in skip
                and b.fits(tokens)
                and (best is None or b.load < best.load)
            ):
                best = b
        return best

    def reserve(self, backend: BackendSlots, tokens: int) -> Reservation:
        backend.in_flight += 1
        backend.reserved_tokens += tokens
        backend.admitted_total += 1
        return Reservation(backend.name, tokens)

    def release(self, reservation: Reservation) -> None:
        b = self._backends.get(reservation.backend)
        if b is None:  # backend removed by a reload while the request ran
            return
        if b.in_flight < 1 or b.reserved_tokens < reservation.tokens:
            # checked before touching the counts: a refused release leaves them as they were
            raise AssertionError(f"backend {b.name!r}: released more than was reserved")
        b.in_flight -= 1
        b.reserved_tokens -= reservation.tokens

    def in_flight(self) -> int:
        return sum(b.in_flight for b in self._backends.values())

"""Per-tenant cap on requests in flight (``max_in_flight``): a paused tenant is passed over by
the order, never stalls it, and comes back when one of its requests ends. Plain synchronous
tests over the pure scheduler and the dispatch core (time is a number)."""

from __future__ import annotations

import pytest

from gateway.admission import AdmissionController, BackendSlots
from gateway.core import DispatchCore, Grant
from gateway.scheduler import Job, Scheduler, make_scheduler


def job(tenant: str, model: str = "m", prompt: int = 10, mx: int = 10) -> Job:
    return Job(tenant, prompt, mx, 0.0, model)


@pytest.mark.parametrize("policy", ["vtc", "lcf", "vtc-predict", "fcfs"])
def test_a_paused_tenant_is_passed_over_and_keeps_its_place(policy: str) -> None:
    s: Scheduler = make_scheduler(policy)
    a_jobs = [job("a") for _ in range(3)]
    for j in a_jobs:
        s.submit(j, 0.0)  # a is first in every order (oldest heads, counter 0)
    b_jobs = [job("b") for _ in range(2)]
    for j in b_jobs:
        s.submit(j, 0.0)
    s.pause("a")
    assert s.paused("a")
    assert s.peek(0.0) is b_jobs[0]
    assert s.pop(0.0) is b_jobs[0]
    assert s.pop(0.0) is b_jobs[1]
    assert s.peek(0.0) is None and s.pop(0.0) is None  # only paused work is left
    assert s.queued("a") == 3 and "a" in set(s.backlogged())  # still queued, still backlogged
    s.resume("a")
    assert [s.pop(0.0) for _ in range(3)] == a_jobs  # FIFO order kept
    assert s.total_queued() == 0


def test_a_paused_tenant_with_the_lowest_counter_does_not_hold_up_the_order() -> None:
    s = make_scheduler("vtc")
    for t in ("a", "b", "c"):
        for _ in range(2):
            s.submit(job(t), 0.0)
    s.set_counter("b", 100.0)
    s.set_counter("c", 200.0)
    s.pause("a")  # a has the lowest counter
    assert [s.pop(0.0).tenant for _ in range(2)] == ["b", "b"]  # type: ignore[union-attr]
    s.resume("a")
    assert s.peek(0.0).tenant == "a"  # type: ignore[union-attr]
    s.cancel(s.peek(0.0), 0.0)  # type: ignore[arg-type]
    s.pause("a")
    s.submit(job("a"), 0.0)  # an arrival while paused queues, still passed over
    assert s.pop(0.0).tenant == "c"  # type: ignore[union-attr]
    s.resume("a")
    assert [s.pop(0.0).tenant for _ in range(3)] == ["a", "a", "c"]  # type: ignore[union-attr]


def test_no_slot_is_held_for_a_tenant_at_its_cap() -> None:
    s = make_scheduler("vtc")
    done = job("b")
    s.submit(done, 0.0)
    s.pop(0.0)
    s.finish(done, 0.0)  # b: counter 20, queue empty
    s.hold(done)  # its next request is expected (the dispatcher holds its slot)
    s.submit(job("a"), 0.0)
    s.set_counter("a", 1000.0)
    assert s.entitled("b", 0.0)  # b's next request would precede a's head
    s.pause("b")
    assert not s.entitled("b", 0.0)


class Harness:
    """A dispatch core over one backend (``seqs`` sequences); grants are recorded."""

    def __init__(self, seqs: int, models: frozenset[str] = frozenset({"m"})) -> None:
        self.backend = BackendSlots("b0", models, seqs, 1_000_000)
        self.admission = AdmissionController([self.backend])
        self.granted: list[tuple[Job, Grant]] = []
        self.core = DispatchCore(self.admission, lambda j, g: self.granted.append((j, g)))

    def submit(self, *jobs: Job) -> None:
        for j in jobs:
            self.core.submit(j)
            self.core.pump(j.model)

    def release(self, tenant: str) -> Job:
        i = next(i for i, (j, _) in enumerate(self.granted) if j.tenant == tenant)
        j, g = self.granted.pop(i)
        self.core.release(j, g)
        return j

    def running(self, tenant: str) -> int:
        return sum(1 for j, _ in self.granted if j.tenant == tenant)


def test_core_caps_a_tenant_and_gives_the_rest_of_the_batch_to_others() -> None:
    h = Harness(seqs=4)
    h.core.set_tenant("a", 1.0, max_in_flight=1)
    h.core.set_tenant("b", 1.0)
    h.submit(*(job("a") for _ in range(4)))  # a first: its head leads the fair order
    h.submit(*(job("b") for _ in range(4)))
    assert (h.running("a"), h.running("b")) == (1, 3)  # a's head did not stall b
    assert h.core.queued("a") == 3 and h.core.queued("b") == 1
    h.release("b")  # a freed slot goes to b: a is still at its cap
    assert (h.running("a"), h.running("b")) == (1, 3) and h.core.queued("b") == 0
    h.release("a")  # a below its cap: resumed, its next request takes the freed slot
    assert (h.running("a"), h.running("b")) == (1, 3) and h.core.queued("a") == 2
    while h.granted:
        h.release(h.granted[0][0].tenant)
    assert h.core.total_queued() == 0 and h.core.running == {"a": 0, "b": 0}
    assert h.admission.in_flight() == 0 and h.backend.booked_tokens == 0


def test_cap_counts_requests_in_every_pool() -> None:
    h = Harness(seqs=8, models=frozenset({"m", "n"}))
    h.core.set_tenant("a", 1.0, max_in_flight=2)
    h.submit(job("a", "m"), job("a", "m"))
    h.submit(job("a", "n"), job("a", "n"))  # a new pool starts with a paused
    assert h.running("a") == 2 and h.core.queued("a") == 2
    first = h.release("a")  # a "m" request ends: the "n" pool gets the slot
    assert first.model == "m"
    assert [j.model for j, _ in h.granted] == ["m", "n"]


def test_a_refused_job_and_a_changed_cap_resume_the_tenant() -> None:
    h = Harness(seqs=4)
    h.core.set_tenant("a", 1.0, max_in_flight=1)
    h.submit(job("a"), job("a"), job("a"))
    j, g = h.granted.pop()
    h.admission.release(g.reservation)  # what move() does when no other backend has room
    h.core.abandon(j)  # never ran: refunded, and a resumes
    assert h.running("a") == 1 and h.core.queued("a") == 1
    h.core.set_tenant("a", 1.0, max_in_flight=None)  # a reload lifts the cap
    h.core.pump_all()
    assert h.running("a") == 2 and h.core.queued("a") == 0
    h.core.set_tenant("a", 1.0, max_in_flight=1)  # a tighter cap: running ones go on
    h.submit(job("a"))
    assert h.running("a") == 2 and h.core.queued("a") == 1
    h.release("a")
    assert h.running("a") == 1 and h.core.queued("a") == 1  # still at the cap of 1
    h.release("a")
    assert h.running("a") == 1 and h.core.queued("a") == 0

"""The dispatcher without HTTP: grants, the prompt correction, release."""

from __future__ import annotations

import asyncio

from gateway.admission import AdmissionController, BackendSlots
from gateway.dispatcher import Dispatcher
from gateway.scheduler import Job

from .conftest import wait_for


async def test_backend_prompt_count_corrects_the_reservation_and_frees_room() -> None:
    slots = BackendSlots("b", frozenset({"m"}), max_num_seqs=8, max_kv_tokens=300)
    d = Dispatcher(AdmissionController([slots]))
    d.core.set_tenant("a", 1.0, max_queued=10)
    first = Job("a", prompt_tokens=100, max_tokens=100, arrival=0.0, model="m")
    grant = await d.acquire(first, 1.0)
    assert slots.reserved_tokens == 200
    second = Job("a", prompt_tokens=50, max_tokens=100, arrival=0.0, model="m")
    task = asyncio.ensure_future(d.acquire(second, 5.0))
    await wait_for(lambda: d.core.total_queued() == 1)  # 200 + 150 > 300: it waits
    # the backend says the first prompt was 40 tokens, not 100: the booking shrinks to 140 and
    # the queued job fits now
    d.core.on_output(first, grant, 1, prompt_tokens=40)
    second_grant = await task
    assert slots.reserved_tokens == 140 + 150
    d.core.release(first, grant)
    d.core.release(second, second_grant)
    assert slots.reserved_tokens == 0 and slots.in_flight == 0

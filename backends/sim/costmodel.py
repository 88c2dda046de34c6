"""Step-time cost model and named hardware profiles.

One engine step runs one forward pass over every token scheduled in it (prefill chunks plus one
token per decoding request). Its duration is modelled as

    T = max(L_floor, a + b*N) + k * sum(decode context tokens) + overhead

* ``N``: tokens scheduled in the step (prefill chunk tokens + one per decode);
* ``L_floor``: the memory-bound floor (reading the weights once per step);
* ``a + b*N``: the compute-bound regime once the batch is large enough;
* ``k``: attention cost per context token of each decoding request (reading its KV cache);
* ``overhead``: fixed per-step CPU cost (scheduling, sampling, detokenisation).

The coefficients of the H100/Llama-2-7B and A100/Llama-3-8B profiles are fitted from Vidur's
profiles (see ``backends/sim/README.md``); ``h100-llama3-8b`` scales the H100/Llama-2-7B fit by the
parameter ratio (8.03 B / 6.74 B). The ``a10g-llama2-7b`` profile is calibrated to the VTC paper's
measurements instead (``python -m backends.sim.calibrate``): with the paper engine's peak-memory
admission, the ``overload`` workload gives about 886 tokens/s (prompt + output; paper 876-904)
and the Chatbot Arena trace about 780 (paper 773-783), like S-LoRA on an A10G.

Everything here is pure: no I/O, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

__all__ = [
    "PROFILES",
    "CostModel",
    "KvAdmission",
    "Profile",
    "get_profile",
]

#: How the engine decides that a waiting request's KV fits (see :mod:`backends.sim.engine`).
KvAdmission = Literal["blocks", "reserve", "peak"]


@dataclass(frozen=True, slots=True)
class CostModel:
    """Coefficients of the step-time formula; all times in seconds.

    Attributes:
        l_floor: memory-bound floor of a forward pass (s).
        a: fixed part of the compute-bound regime (s).
        b: compute cost per scheduled token (s/token).
        k: attention cost per context token of each decoding request (s/token).
        overhead: fixed per-step CPU overhead (s).
    """

    l_floor: float
    a: float
    b: float
    k: float = 0.0
    overhead: float = 0.0

    def __post_init__(self) -> None:
        for name in ("l_floor", "a", "b", "k", "overhead"):
            value = getattr(self, name)
            if not value >= 0.0:  # also rejects NaN
                raise ValueError(f"cost model: {name} must be >= 0, got {value!r}")

    def step_time(self, num_tokens: int, decode_context_tokens: int = 0) -> float:
        """Duration (s) of one step that schedules ``num_tokens`` tokens.

        ``decode_context_tokens`` is the sum over decoding requests of their context length
        (tokens whose KV cache the step reads). A step that schedules nothing takes no time.
        """
        if num_tokens <= 0:
            return 0.0
        compute = self.a + self.b * num_tokens
        base = compute if compute > self.l_floor else self.l_floor
        return base + self.k * decode_context_tokens + self.overhead

    def scaled(self, factor: float) -> CostModel:
        """A model whose every coefficient is multiplied by ``factor`` (a slower/faster card)."""
        return CostModel(
            l_floor=self.l_floor * factor,
            a=self.a * factor,
            b=self.b * factor,
            k=self.k * factor,
            overhead=self.overhead * factor,
        )


@dataclass(frozen=True, slots=True)
class Profile:
    """A named hardware + model setting: cost model and engine defaults.

    Attributes:
        name: profile key, e.g. ``"h100-llama3-8b"``.
        description: one line for humans.
        cost: the step-time coefficients.
        kv_cache_tokens: KV-cache capacity in tokens (what vLLM logs as "GPU KV cache size").
        max_num_seqs: concurrent sequences in the running batch.
        max_num_batched_tokens: token budget of one step (chunked prefill).
        max_model_len: context length (prompt + output).
        admit_every_n_steps: new requests join the batch at most every n steps (1 = vLLM).
        kv_admission: ``"blocks"`` (vLLM: blocks allocated as tokens are computed, preemption
            when the cache is full), ``"reserve"`` (prompt + max_tokens allocated at admission)
            or ``"peak"`` (S-LoRA's peak-future-memory check, the paper's engine).
        block_size: KV block size in tokens (vLLM: 16; S-LoRA's token-level pool: 1).
    """

    name: str
    description: str
    cost: CostModel
    kv_cache_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    admit_every_n_steps: int = 1
    kv_admission: KvAdmission = "blocks"
    block_size: int = 16

    def with_cost(self, cost: CostModel) -> Profile:
        """The same profile with other coefficients (for retuning experiments)."""
        return replace(self, cost=cost)


_US = 1e-6
_MS = 1e-3
_NS = 1e-9

#: Parameter ratio Llama-3-8B / Llama-2-7B used to derive the H100/Llama-3-8B fit.
_LLAMA3_OVER_LLAMA2 = 8.03 / 6.74

_H100_LLAMA2 = CostModel(l_floor=5.8 * _MS, a=2.9 * _MS, b=20.2 * _US, k=196 * _NS)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="h100-llama3-8b",
            description="H100 80GB, Llama-3-8B (GQA), bf16; H100/Llama-2-7B fit x 8.03/6.74",
            cost=CostModel(
                l_floor=5.8 * _MS * _LLAMA3_OVER_LLAMA2,
                a=2.9 * _MS * _LLAMA3_OVER_LLAMA2,
                b=20.2 * _US * _LLAMA3_OVER_LLAMA2,
                k=49 * _NS,
            ),
            kv_cache_tokens=450_000,
            max_num_seqs=1024,
            max_num_batched_tokens=8192,
            max_model_len=8192,
        ),
        Profile(
            name="a100-llama3-8b",
            description="A100 80GB, Llama-3-8B (GQA), bf16; Vidur fit",
            cost=CostModel(l_floor=10.5 * _MS, a=7.0 * _MS, b=66.4 * _US, k=80 * _NS),
            kv_cache_tokens=450_000,
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            max_model_len=8192,
        ),
        Profile(
            name="h100-llama2-7b",
            description="H100 80GB, Llama-2-7B (MHA), fp16; Vidur fit",
            cost=_H100_LLAMA2,
            kv_cache_tokens=110_000,
            max_num_seqs=1024,
            max_num_batched_tokens=8192,
            max_model_len=4096,
        ),
        Profile(
            name="a10g-llama2-7b",
            description=(
                "A10G 24GB, Llama-2-7B, the VTC paper's S-LoRA engine: 10k-token KV pool "
                "(token-level), peak-future-memory admission every 10 steps"
            ),
            # calibrated with peak admission on both paper numbers (backends.sim.calibrate):
            # overload ~886 tok/s (paper 876-904), arena trace ~778 in the lab (paper ~777)
            cost=CostModel(
                l_floor=25.0 * _MS, a=22.0 * _MS, b=160 * _US, k=1530 * _NS, overhead=5.0 * _MS
            ),
            kv_cache_tokens=10_000,
            max_num_seqs=256,
            max_num_batched_tokens=4096,
            max_model_len=4096,
            admit_every_n_steps=10,
            kv_admission="peak",
            block_size=1,
        ),
    )
}


def get_profile(name: str) -> Profile:
    """Return the profile called ``name``; ``KeyError`` lists the known names."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise KeyError(f"unknown profile {name!r}; known profiles: {known}") from None

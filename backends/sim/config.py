"""Configuration of one simulated server, validated once at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from backends.sim.costmodel import CostModel, KvAdmission, Profile, get_profile
from backends.sim.engine import EngineConfig
from backends.sim.faults import FaultSpec
from backends.sim.ratelimit import RateLimits

__all__ = ["PROVIDER_KV_CACHE_TOKENS", "PROVIDER_MAX_NUM_SEQS", "SimConfig"]

#: ``provider`` mode's engine limits when not given: no queueing on batch slots or KV.
PROVIDER_MAX_NUM_SEQS = 65_536
PROVIDER_KV_CACHE_TOKENS = 1 << 30


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything a simulated server needs; ``None`` engine limits take the profile's default.

    Attributes:
        host, port: where to listen (port 0 picks a free port).
        model: the served model name (``/v1/models`` lists it; other names get 404).
        profile: a key of :data:`backends.sim.costmodel.PROFILES`.
        max_num_seqs, max_num_batched_tokens, kv_cache_tokens, max_model_len: engine limits.
        kv_admission: the engine's KV admission (``blocks``, ``reserve``, ``peak``).
        speed: simulated-time scale (2.0 = twice real time; 0 = no delays at all).
        seed: seeds generated text, output lengths and probabilistic faults.
        median_output_tokens: median output length without ``ignore_eos``.
        faults: server-wide faults (see :mod:`backends.sim.faults`).
        cost: coefficients that replace the profile's (for experiments).
        tpm, rpm, rate_window_s: a hosted provider's quota (tokens and requests per
            ``rate_window_s`` seconds of wall time, see :mod:`backends.sim.ratelimit`); off
            while both are ``None``.
        provider: behave as a hosted provider: ``max_num_seqs`` and ``kv_cache_tokens``
            default to :data:`PROVIDER_MAX_NUM_SEQS` and :data:`PROVIDER_KV_CACHE_TOKENS`
            (effectively unlimited) instead of the profile's.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "sim-llama-3-8b"
    profile: str = "h100-llama3-8b"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None
    kv_admission: KvAdmission | None = None
    speed: float = 1.0
    seed: int = 0
    median_output_tokens: int = 128
    faults: tuple[FaultSpec, ...] = ()
    cost: CostModel | None = None
    tpm: int | None = None
    rpm: int | None = None
    rate_window_s: float = 60.0
    provider: bool = False

    def __post_init__(self) -> None:
        get_profile(self.profile)  # KeyError naming the known profiles
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0-65535, got {self.port}")
        if not self.speed >= 0:
            raise ValueError(f"speed must be >= 0 (0 = no delays), got {self.speed}")
        if not self.model:
            raise ValueError("model name must not be empty")
        if self.median_output_tokens < 1:
            raise ValueError("median_output_tokens must be >= 1")
        self.engine_config()  # validates the limits
        self.rate_limits()  # validates the quota

    def resolved_profile(self) -> Profile:
        """The named profile."""
        return get_profile(self.profile)

    def engine_config(self) -> EngineConfig:
        """Engine limits: the profile's defaults with this config's overrides."""
        max_num_seqs, kv_cache_tokens = self.max_num_seqs, self.kv_cache_tokens
        if self.provider:
            max_num_seqs = max_num_seqs if max_num_seqs is not None else PROVIDER_MAX_NUM_SEQS
            kv_cache_tokens = (
                kv_cache_tokens if kv_cache_tokens is not None else PROVIDER_KV_CACHE_TOKENS
            )
        engine = EngineConfig.from_profile(
            self.resolved_profile(),
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_tokens=kv_cache_tokens,
            max_model_len=self.max_model_len,
            kv_admission=self.kv_admission,
        )
        # as vLLM's block pool: one block (the "null block") is never handed to a request
        return dataclasses.replace(engine, null_block=engine.kv_admission == "blocks")

    def cost_model(self) -> CostModel:
        """The step-time coefficients in force."""
        return self.cost if self.cost is not None else self.resolved_profile().cost

    def rate_limits(self) -> RateLimits | None:
        """The quota in force, or ``None`` when neither ``tpm`` nor ``rpm`` is set."""
        limits = RateLimits(tpm=self.tpm, rpm=self.rpm, window_s=self.rate_window_s)
        return limits if limits.enabled else None

"""``lab simulate --replicas``: gateway replicas sharing one fair order, or each on its own.

Tenant a (weight 1) reaches only replica 0, tenant b (weight 4) only replica 1 (``skewed``
ingress), both flooding one backend. Sharing the order (``vtc``, charges synced every
``sync_s``) keeps 1:4; replicas scheduling on their own (``vtc-local``, each booking the whole
backend) end near 1:1, whatever the weights, and their service gap grows past 2U.
"""

from __future__ import annotations

import pytest

from gateway.lab import metrics as m
from gateway.lab.simulate import SimConfig, simulate
from gateway.lab.workloads import ClientSpec, Workload, synthesize
from gateway.scheduler import Prices

P = Prices()


def workload() -> Workload:
    clients = [ClientSpec("a", 3.0, weight=1), ClientSpec("b", 3.0, weight=4)]
    return synthesize("replicas", 120, clients, seed=1)


def share_a(policy: str, **kw: object) -> tuple[float, m.Summary]:
    wl = workload()
    run = simulate(wl, policy, SimConfig(replicas=2, ingress="skewed", **kw))  # type: ignore[arg-type]
    svc = {t: sum(m.service_in(r, 12, 120, P) for r in run.records if r.tenant == t) for t in "ab"}
    summary = m.summarize(
        run.records, wl.tenants, wl.duration_s, P, run.kv_cache_tokens, wl.longest_prompt()
    )
    return svc["a"] / (svc["a"] + svc["b"]), summary


@pytest.mark.parametrize("sync_s", [0.001, 0.01, 0.05])
def test_a_shared_order_keeps_the_weights_across_replicas(sync_s: float) -> None:
    share, summary = share_a("vtc", sync_s=sync_s)
    assert share == pytest.approx(0.2, rel=0.1)
    assert summary.max_acc_gap < summary.bound_2u


def test_replicas_on_their_own_ignore_the_weights() -> None:
    share, summary = share_a("vtc-local")
    assert share > 0.4  # ~1:1, not 1:4
    assert summary.max_acc_gap > summary.bound_2u


def test_without_sync_delay_replicas_decide_like_one_process() -> None:
    wl = workload()
    one = simulate(wl, "vtc", SimConfig())
    two = simulate(wl, "vtc", SimConfig(replicas=2, ingress="uniform", sync_s=0.0))
    assert [(r.first_token_s, r.finish_s) for r in one.records] == [
        (r.first_token_s, r.finish_s) for r in two.records
    ]


def test_ingress_mapping_and_its_errors() -> None:
    wl = workload()
    mapped = simulate(wl, "vtc-local", SimConfig(replicas=2, ingress="a=0,b=1"))
    skewed = simulate(wl, "vtc-local", SimConfig(replicas=2, ingress="skewed"))
    assert [r.finish_s for r in mapped.records] == [r.finish_s for r in skewed.records]
    with pytest.raises(ValueError, match="ingress"):
        simulate(wl, "vtc", SimConfig(replicas=2, ingress="a=2"))
    with pytest.raises(ValueError, match="replicas"):
        simulate(wl, "vtc-local", SimConfig())

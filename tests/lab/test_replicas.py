"""``lab simulate --replicas``: gateway replicas sharing one fair order, or each on its own.

Tenant a (weight 1) reaches only replica 0, tenant b (weight 4) only replica 1 (``skewed``
ingress), both flooding one backend. Sharing the order (``vtc``: each replica claims its slots
from the cluster's rule, :class:`gateway.cluster.rule.SharedState`, charges flushed with its
claims and synced every ``sync_s``) keeps 1:4; replicas scheduling on their own (``vtc-local``,
each booking the whole backend) end near 1:1, whatever the weights, and their service gap grows
past 2U.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.lab import metrics as m
from gateway.lab.simulate import SimConfig, simulate
from gateway.lab.workloads import ClientSpec, Workload, load_workload, synthesize
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
    """With every charge in the shared order as it is made, two replicas decide exactly as one
    process when the KV check is a sum of bookings (``"reserve"``: the shared ledger's sum is
    then the one process's; under ``"predict"`` the ledger adds up each replica's own plan, a
    bound of the one process's; the paper's engine, ``"peak"``, stays the engine's)."""
    wl = workload()
    one = simulate(wl, "vtc", SimConfig(kv_admission="reserve", engine_kv_admission="peak"))
    two = simulate(
        wl,
        "vtc",
        SimConfig(
            replicas=2,
            ingress="uniform",
            sync_s=0.0,
            kv_admission="reserve",
            engine_kv_admission="peak",
        ),
    )
    assert [(r.first_token_s, r.finish_s) for r in one.records] == [
        (r.first_token_s, r.finish_s) for r in two.records
    ]
    assert two.shared is not None and two.shared.returned == 0


def dispatched(records: list[m.RequestRecord]) -> int:
    return sum(1 for r in records if r.status == "ok")


def test_the_replicas_claim_every_slot_from_the_shared_state() -> None:
    """Every request ran on a slot the shared order granted (less those given back), and the
    replicas asked it often: claims, syncs and the marks of tenants waiting behind."""
    wl = workload()
    run = simulate(wl, "vtc", SimConfig(replicas=2, ingress="skewed"))
    shared = run.shared
    assert shared is not None
    assert shared.granted - shared.returned == dispatched(run.records) == len(wl.requests)
    assert shared.claims >= shared.granted / 8 and shared.syncs and shared.marks
    assert simulate(wl, "vtc", SimConfig()).shared is None


ORGS = """
duration: 120
max_num_seqs: 8
tenants:
  - {name: org-x, weight: 1, tenants: [{name: a}]}
  - {name: org-y, weight: 4, tenants: [{name: b1}, {name: b2}]}
clients:
  - {name: a, concurrency: 8, prompt_tokens: 64, output_tokens: 128}
  - {name: b1, concurrency: 8, prompt_tokens: 64, output_tokens: 128}
  - {name: b2, concurrency: 8, prompt_tokens: 64, output_tokens: 128}
"""


def test_a_tree_keeps_its_weights_across_replicas(tmp_path: Path) -> None:
    """Org x (weight 1, team a) only at replica 0, org y (weight 4, teams b1 and b2) only at
    replica 1, closed-loop clients (their next requests held through hold claims): the shared
    order keeps 1:4 between the orgs and 1:1 between y's teams; replicas on their own split the
    backend between the orgs by replica."""
    spec = tmp_path / "orgs.yaml"
    spec.write_text(ORGS)
    wl = load_workload(str(spec))
    ingress = "a=0,b1=1,b2=1"
    run = simulate(wl, "vtc", SimConfig(hold_s=0.02, replicas=2, ingress=ingress))
    shares = m.level_shares(run.records, wl.paths(), 15, 110, P)
    assert shares[1] == pytest.approx({"org-x": 1 / 5, "org-y": 4 / 5}, rel=0.05)
    assert shares[2] == pytest.approx({"org-x/a": 0.2, "org-y/b1": 0.4, "org-y/b2": 0.4}, rel=0.05)
    shared = run.shared
    assert shared is not None and shared.hold_claims and shared.holds
    assert shared.granted - shared.returned == dispatched(run.records)
    alone = simulate(wl, "vtc-local", SimConfig(hold_s=0.02, replicas=2, ingress=ingress))
    assert m.level_shares(alone.records, wl.paths(), 15, 110, P)[1]["org-x"] > 0.4


def test_ingress_mapping_and_its_errors() -> None:
    wl = workload()
    mapped = simulate(wl, "vtc-local", SimConfig(replicas=2, ingress="a=0,b=1"))
    skewed = simulate(wl, "vtc-local", SimConfig(replicas=2, ingress="skewed"))
    assert [r.finish_s for r in mapped.records] == [r.finish_s for r in skewed.records]
    with pytest.raises(ValueError, match="ingress"):
        simulate(wl, "vtc", SimConfig(replicas=2, ingress="a=2"))
    with pytest.raises(ValueError, match="replicas"):
        simulate(wl, "vtc-local", SimConfig())
    with pytest.raises(ValueError, match="cannot share its order"):
        simulate(wl, "fcfs", SimConfig(replicas=2))

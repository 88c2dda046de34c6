"""Nested tenants in the configuration: the tree, its checks and its defaults."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, parse_config, parse_tenant_tree

BACKENDS = [{"name": "b", "url": "http://127.0.0.1:8000"}]


def config(tenants: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"backends": BACKENDS, "tenants": tenants, **extra}


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(doc)
    return exc.value.problems


TREE = [
    {
        "name": "org",
        "weight": 3,
        "max_in_flight": 8,
        "tenants": [
            {"name": "team", "tenants": [{"name": "alice", "api_keys": ["k1"]}]},
            {"name": "bob", "api_keys": ["k2"], "max_queued": 5},
        ],
    },
    {"name": "solo", "tier": "batch", "api_keys": ["k3"]},
]


def test_a_tree_gives_nodes_parents_first_with_paths_tiers_and_limits() -> None:
    cfg = parse_config(config(TREE))
    assert cfg.hierarchical
    nodes = {n.name: n for n in cfg.nodes()}
    assert [n.path for n in cfg.nodes()] == ["org", "org/team", "org/team/alice", "org/bob", "solo"]
    assert nodes["alice"].parent == "team" and nodes["team"].parent == "org"
    assert [t.name for t in cfg.leaves()] == ["alice", "bob", "solo"]
    assert nodes["solo"].priority < nodes["alice"].priority  # batch below interactive
    assert nodes["org"].config.queue_limit is None  # a group: no queue limit of its own
    assert nodes["alice"].config.queue_limit == 1024 and nodes["bob"].config.queue_limit == 5
    assert cfg.tenant("alice") is not None and cfg.tenant("team") is None  # leaves only
    redacted = cfg.redacted()["tenants"][0]["tenants"][0]["tenants"][0]["api_keys"][0]
    assert redacted.startswith("sha256:") and "k1" not in redacted


def test_a_flat_list_is_unchanged() -> None:
    cfg = parse_config(config([{"name": "a", "api_keys": ["k"]}, {"name": "b"}]))
    assert not cfg.hierarchical
    assert [(n.name, n.parent, n.path) for n in cfg.nodes()] == [
        ("a", None, "a"),
        ("b", None, "b"),
    ]


def test_tree_mistakes_are_reported_with_their_key_paths() -> None:
    bad = [
        {
            "name": "org",
            "api_keys": ["k0"],
            "tenants": [
                {"name": "t1", "tier": "batch", "api_keys": ["k1"]},
                {"name": "org", "api_keys": ["k2"]},
                {"name": "t3", "weight": 0},
            ],
        }
    ]
    got = problems(config(bad))
    assert "tenants[0].api_keys: a group has no keys: keys belong to its tenants" in got
    assert any(p.startswith("tenants[0].tenants[0].tier: is set on top-level nodes") for p in got)
    assert "tenants[0].tenants[1].name: duplicate name, got 'org'" in got
    assert any(p.startswith("tenants[0].tenants[2].weight") for p in got)


def test_a_tree_needs_a_counting_policy_and_is_shared_by_a_cluster() -> None:
    got = problems(config(TREE, scheduler={"policy": "fcfs"}))
    assert any(p.startswith("scheduler.policy: nested tenants need") for p in got)
    tree = [{"name": "org", "tenants": [{"name": "t", "api_keys": ["k"]}]}]
    parsed = parse_config(config(tree, cluster={"url": "redis://127.0.0.1:6379/0"}))
    assert parsed.hierarchical
    tree[0]["max_in_flight"] = 2
    parsed = parse_config(config(tree, cluster={"url": "redis://127.0.0.1:6379/0"}))
    assert parsed.tenants[0].max_in_flight == 2


def test_anonymous_tenant_must_be_a_leaf() -> None:
    got = problems(config(TREE, auth={"anonymous_tenant": "org"}))
    assert any(p.startswith("auth.anonymous_tenant: must name a tenant (a leaf)") for p in got)


def test_depth_is_bounded() -> None:
    node: dict[str, Any] = {"name": "leaf"}
    for i in range(7):
        node = {"name": f"g{i}", "tenants": [node]}
    got = problems(config([node]))
    assert any("nested deeper than 6 levels" in p for p in got)


def test_parse_tenant_tree_alone() -> None:
    nodes = parse_tenant_tree([{"name": "o", "tenants": [{"name": "t"}]}])
    assert [(n.path, n.leaf) for n in nodes] == [("o", False), ("o/t", True)]
    with pytest.raises(ConfigError, match="duplicate name"):
        parse_tenant_tree([{"name": "o", "tenants": [{"name": "o"}]}])

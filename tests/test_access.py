import json
from pathlib import Path

import pytest

from core.settings import Settings
from miner.access import AccessPolicy, MetagraphView, Neuron, RateLimiter


def policy(metagraph: MetagraphView | None = None, **settings: object) -> AccessPolicy:
    return AccessPolicy(Settings(**settings), MetagraphView() if metagraph is None else metagraph)  # type: ignore[arg-type]


def test_unsigned_is_refused_everywhere() -> None:
    assert policy(local=True).refuse("5abc", signed=False) == "unsigned request"
    assert policy(local=True).refuse(None, signed=True) == "unsigned request"


def test_local_allow_list() -> None:
    assert policy(local=True).refuse("5any", signed=True) is None  # empty list: any signed hotkey
    strict = policy(local=True, allowed_hotkeys=["5good"])
    assert strict.refuse("5good", signed=True) is None
    assert strict.refuse("5bad", signed=True) == "hotkey not in the allow-list"


def test_chain_rules_registration_stake_and_permit() -> None:
    graph = MetagraphView({"5rich": Neuron("5rich", 100_000, True), "5poor": Neuron("5poor", 10, True),
                           "5noperm": Neuron("5noperm", 100_000, False)}, loaded=True)
    p = policy(graph, local=False)
    assert p.refuse("5rich", True) is None
    assert "not registered" in (p.refuse("5ghost", True) or "")
    assert "below the minimum" in (p.refuse("5poor", True) or "")
    assert p.refuse("5noperm", True) == "no validator permit"
    assert p.priority("5rich") == 100_000 and p.priority("5ghost") == 0.0


def test_an_allow_list_also_binds_on_chain() -> None:
    """An operator who lists the validators to serve means it in production too: a registered, staked hotkey
    not on the list is refused, before the metagraph is even consulted."""
    graph = MetagraphView({"5good": Neuron("5good", 100_000, True), "5other": Neuron("5other", 100_000, True)},
                          loaded=True)
    p = policy(graph, local=False, allowed_hotkeys=["5good"])
    assert p.refuse("5good", True) is None
    assert p.refuse("5other", True) == "hotkey not in the allow-list"


def test_production_refuses_everyone_until_the_metagraph_is_read() -> None:
    graph = MetagraphView()
    p = policy(graph, local=False)
    assert p.refuse("5rich", True) == "metagraph not read yet: try again shortly"
    graph.replace({"5rich": Neuron("5rich", 100_000, True)})
    assert p.refuse("5rich", True) is None


def test_rate_limit_sliding_window() -> None:
    limiter = RateLimiter(per_minute=3)
    assert all(limiter.allow("k", now=t) for t in (0.0, 1.0, 2.0))
    assert not limiter.allow("k", now=3.0)
    assert limiter.allow("other", now=3.0)
    assert limiter.allow("k", now=61.0)


def test_the_rate_limiter_forgets_hotkeys_idle_for_a_window() -> None:
    """Each signed hotkey that reached the limiter kept an entry for good (any signer does in --local)."""
    limiter = RateLimiter(per_minute=2)
    for i in range(5000):
        assert limiter.allow(f"old{i}", now=0.0)
    assert limiter.allow("busy", now=59.0) and limiter.allow("busy", now=59.5)
    for i in range(5000):
        assert limiter.allow(f"new{i}", now=61.0)
    assert len(limiter._hits) <= 5001 and "old0" not in limiter._hits
    assert not limiter.allow("busy", now=62.0)  # a hotkey still within its window keeps its count


def test_static_metagraph_file(tmp_path: Path) -> None:
    path = tmp_path / "graph.json"
    path.write_text(json.dumps([{"hotkey": "5v", "stake": 70_000, "validator_permit": True}]))
    graph = MetagraphView.from_file(path)
    assert policy(graph, local=True).refuse("5v", True) is None
    assert "not registered" in (policy(graph, local=True).refuse("5x", True) or "")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="metagraph file"):
        MetagraphView.from_file(path)


@pytest.mark.parametrize("row", [
    {"hotkey": "5v", "stake": 70_000, "validator_permit": "false"},  # a string is not a permit
    {"hotkey": "5v", "stake": 70_000, "validator_permit": "no"},
    {"hotkey": "5v", "stake": "NaN", "validator_permit": True},
    {"hotkey": "5v", "stake": True, "validator_permit": True},
    {"hotkey": 5, "stake": 70_000, "validator_permit": True},
])
def test_a_metagraph_file_row_that_does_not_say_what_it_means_is_refused(tmp_path: Path,
                                                                        row: dict[str, object]) -> None:
    path = tmp_path / "graph.json"
    path.write_text(json.dumps([row]))
    with pytest.raises(ValueError, match="metagraph file"):
        MetagraphView.from_file(path)


def test_a_stake_that_is_not_a_number_never_passes_the_minimum(tmp_path: Path) -> None:
    path = tmp_path / "graph.json"
    path.write_text('[{"hotkey": "5v", "stake": NaN, "validator_permit": true}]')  # json.loads accepts NaN
    with pytest.raises(ValueError, match="metagraph file"):
        MetagraphView.from_file(path)
    graph = MetagraphView({"5v": Neuron("5v", float("nan"), True)}, loaded=True)  # as a chain read could give
    assert "below the minimum" in (policy(graph, local=False).refuse("5v", True) or "")

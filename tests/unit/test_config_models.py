"""aioproxy.builtins.config_models: the ``[[models]]`` table as deployments; the weighted pick."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from aioproxy import router
from aioproxy.builtins.config_models import ConfigModels
from aioproxy.config import Config, Secret, Timeouts, parse_config
from aioproxy.context import Deployment, Principal
from aioproxy.deployments import deployments_from
from aioproxy.router import Router


def config(*models: dict[str, Any]) -> Config:
    return parse_config({"models": list(models)}, env={})


def named(*names: str) -> Config:
    """A config of models of provider ``p`` with these names, in order."""
    return config(*({"name": name, "provider": "p"} for name in names))


@pytest.fixture
def rng(monkeypatch: pytest.MonkeyPatch) -> random.Random:
    """A seeded generator in place of the router's ``random``, so the global one is untouched."""
    generator = random.Random(20240601)
    monkeypatch.setattr(router, "random", generator)
    return generator


def test_deployments_from_full_entry() -> None:
    table = deployments_from(
        config(
            {
                "name": "gpt",
                "provider": "openai",
                "model": "gpt-4o-mini",
                "api_base": "http://u/v1",
                "api_key": "sk-u",
                "weight": 2,
                "timeouts": {"read": 5},
                "headers": {"X-A": "1"},
                "settings": {"s": 1},
            }
        )
    )
    assert list(table) == ["gpt"]
    [deployment] = table["gpt"]
    assert isinstance(deployment, Deployment)
    assert (deployment.name, deployment.provider, deployment.model) == (
        "gpt",
        "openai",
        "gpt-4o-mini",
    )
    assert deployment.api_base == "http://u/v1"
    assert deployment.api_key == "sk-u" and isinstance(deployment.api_key, Secret)
    assert deployment.weight == 2.0
    assert deployment.timeouts == Timeouts(read=5)
    assert deployment.headers == {"X-A": "1"} and deployment.settings == {"s": 1}


def test_model_defaults_to_name() -> None:
    [deployment] = deployments_from(config({"name": "echo", "provider": "echo"}))["echo"]
    assert deployment.model == "echo"
    assert deployment.api_key is None and deployment.weight == 1.0


def test_groups_by_name_in_config_order() -> None:
    table = deployments_from(
        config(
            {"name": "b", "provider": "p", "model": "b1"},
            {"name": "a", "provider": "p", "model": "a1"},
            {"name": "b", "provider": "q", "model": "b2"},
        )
    )
    assert list(table) == ["b", "a"]
    assert [d.model for d in table["b"]] == ["b1", "b2"]
    assert [d.provider for d in table["b"]] == ["p", "q"]


def test_deployment_ids_unique_per_name() -> None:
    table = deployments_from(named("a", "a", "b"))
    ids = [d.id for ds in table.values() for d in ds]
    assert len(set(ids)) == len(ids) == 3
    # identical entries stay distinct deployments (routing state is kept per deployment)
    assert table["a"][0].key != table["a"][1].key


def test_no_models() -> None:
    assert deployments_from(config()) == {}
    assert ConfigModels(config()).map_model("anything") is None


def test_unknown_model_is_none() -> None:
    assert ConfigModels(named("a")).map_model("b") is None


def test_map_model_offers_every_deployment_in_order() -> None:
    models = ConfigModels(
        config(
            {"name": "m", "provider": "p", "model": "x"},
            {"name": "other", "provider": "p"},
            {"name": "m", "provider": "q", "model": "y"},
        )
    )
    offered = models.map_model("m")
    assert [(d.provider, d.model) for d in offered] == [("p", "x"), ("q", "y")]
    assert offered == models.table["m"]


# --- the weighted choice among a model's deployments (aioproxy.router, strategy "weighted") -------


def pick_many(cfg: Config, model: str, draws: int) -> Counter[str]:
    router = Router(cfg.router)
    candidates = deployments_from(cfg)[model]
    return Counter(router.pick(model, candidates).model for _ in range(draws))


def test_single_deployment_always(rng: random.Random) -> None:
    counts = pick_many(config({"name": "a", "provider": "p", "weight": 0}), "a", 20)
    assert counts == {"a": 20}


def test_weighted_choice_follows_weights(rng: random.Random) -> None:
    cfg = config(
        {"name": "m", "provider": "p", "model": "heavy", "weight": 3},
        {"name": "m", "provider": "p", "model": "light", "weight": 1},
        {"name": "m", "provider": "p", "model": "off", "weight": 0},
    )
    assert cfg.router.strategy == "weighted"  # the default
    counts = pick_many(cfg, "m", 8000)
    assert counts["off"] == 0
    assert set(counts) == {"heavy", "light"}
    # expected 6000 / 2000; sd = sqrt(8000 * .75 * .25) ~ 39: allow > 5 sd
    assert abs(counts["heavy"] - 6000) < 200
    assert abs(counts["light"] - 2000) < 200


def test_zero_weight_never_chosen_between_others(rng: random.Random) -> None:
    counts = pick_many(
        config(
            {"name": "m", "provider": "p", "model": "a", "weight": 1},
            {"name": "m", "provider": "p", "model": "zero", "weight": 0},
            {"name": "m", "provider": "p", "model": "b", "weight": 1},
        ),
        "m",
        2000,
    )
    assert counts["zero"] == 0 and counts["a"] > 800 and counts["b"] > 800


def test_all_zero_weights_pick_the_first(rng: random.Random) -> None:
    counts = pick_many(
        config(
            {"name": "m", "provider": "p", "model": "first", "weight": 0},
            {"name": "m", "provider": "p", "model": "second", "weight": 0},
        ),
        "m",
        50,
    )
    assert counts == {"first": 50}


def test_list_models_filtered_by_principal() -> None:
    models = ConfigModels(named("b", "a", "b", "c"))
    assert list(models.list_models(Principal("all"))) == ["b", "a", "c"]
    assert list(models.list_models(Principal("team", frozenset({"c", "a", "zzz"})))) == ["a", "c"]
    assert list(models.list_models(Principal("none", frozenset()))) == []


def test_hookimpls_are_trylast() -> None:
    assert ConfigModels.map_model.aioproxy_impl["trylast"] is True  # type: ignore[attr-defined]
    assert ConfigModels.list_models.aioproxy_impl["trylast"] is True  # type: ignore[attr-defined]

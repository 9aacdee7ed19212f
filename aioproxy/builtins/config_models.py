"""The config's ``[[models]]`` table as the model map."""

from __future__ import annotations

import random
from collections.abc import Iterable

from ..config import Config
from ..context import Deployment, Principal
from ..hookspecs import hookimpl

__all__ = ["ConfigModels", "deployments_from"]


def deployments_from(config: Config) -> dict[str, tuple[Deployment, ...]]:
    """Every model name with its deployments, in config order."""
    table: dict[str, list[Deployment]] = {}
    for entry in config.models:
        table.setdefault(entry.name, []).append(
            Deployment(
                name=entry.name,
                provider=entry.provider,
                model=entry.model or entry.name,
                api_base=entry.api_base,
                api_key=entry.api_key,
                weight=entry.weight,
                timeouts=entry.timeouts,
                headers=entry.headers,
                settings=entry.settings,
            )
        )
    return {name: tuple(deployments) for name, deployments in table.items()}


class ConfigModels:
    """Maps a model name to one of its configured deployments, at random by ``weight``."""

    def __init__(self, config: Config) -> None:
        self.table = deployments_from(config)
        self._weights = {
            name: [d.weight for d in deployments]
            for name, deployments in self.table.items()
            if len(deployments) > 1
        }

    @hookimpl(trylast=True)
    def map_model(self, model: str) -> Deployment | None:
        deployments = self.table.get(model)
        if deployments is None:
            return None
        if len(deployments) == 1:
            return deployments[0]
        weights = self._weights[model]
        if not any(weights):
            return deployments[0]
        return random.choices(deployments, weights)[0]

    @hookimpl(trylast=True)
    def list_models(self, principal: Principal) -> Iterable[str]:
        return [name for name in self.table if principal.allows(name)]

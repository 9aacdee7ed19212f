"""The config's ``[[models]]`` table as the model map."""

from __future__ import annotations

from collections.abc import Iterable

from ..config import Config
from ..context import Deployment, Principal
from ..hookspecs import hookimpl
from ..routes import Kind

__all__ = ["ConfigModels", "deployments_from"]


def deployments_from(config: Config) -> dict[str, tuple[Deployment, ...]]:
    """Every model name with its deployments, in config order."""
    table: dict[str, list[Deployment]] = {}
    for entry in config.models:
        siblings = table.setdefault(entry.name, [])
        siblings.append(
            Deployment(
                id=f"{entry.name}#{len(siblings)}",
                name=entry.name,
                provider=entry.provider,
                model=entry.model or entry.name,
                api_base=entry.api_base,
                api_key=entry.api_key,
                weight=entry.weight,
                rpm=entry.rpm,
                tpm=entry.tpm,
                timeouts=(
                    entry.timeouts.over(config.upstream.timeouts) if entry.timeouts else None
                ),
                headers=entry.headers,
                settings=entry.settings,
                endpoints=(
                    frozenset(Kind(kind) for kind in entry.endpoints) if entry.endpoints else None
                ),
                price=entry.price,
            )
        )
    return {name: tuple(deployments) for name, deployments in table.items()}


class ConfigModels:
    """Maps a model name to its configured deployments; the router chooses among them."""

    def __init__(self, config: Config) -> None:
        self.table = deployments_from(config)

    @hookimpl(trylast=True)
    def map_model(self, model: str) -> tuple[Deployment, ...] | None:
        return self.table.get(model)

    @hookimpl(trylast=True)
    def list_models(self, principal: Principal) -> Iterable[str]:
        return [name for name in self.table if principal.allows(name)]

"""The config's ``[[models]]`` table as the model map."""

from __future__ import annotations

from collections.abc import Iterable

from ..config import Config
from ..context import Deployment, Principal
from ..deployments import deployments_from
from ..hookspecs import hookimpl

__all__ = ["ConfigModels"]


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

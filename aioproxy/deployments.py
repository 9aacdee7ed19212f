"""The config's ``[[models]]`` table as deployments: what the core routes among and reports on."""

from __future__ import annotations

from .config import Config
from .context import Deployment
from .routes import Kind

__all__ = ["deployments_from"]


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
                reasoning=entry.reasoning,
            )
        )
    return {name: tuple(deployments) for name, deployments in table.items()}

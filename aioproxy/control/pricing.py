"""What a request cost: its usage times the deployment's price, USD.

A deployment's ``price`` (config) wins; otherwise the price comes from ``genai-prices``' bundled
table, which is offline data shipped in the package (its ``UpdatePrices``, the one part that
fetches anything, is never started). The table is looked up once per (provider, model) and kept
as three rates, so pricing a request is a few multiplications.

The table is ~26 MiB of Python objects: a serving process reads the rates of the configured
deployments from a short-lived child (``python -m aioproxy.control.pricing``) at start-up and
never imports it; only a deployment first seen later is looked up in-process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterable
from decimal import Decimal

from ..config import Price
from ..context import Deployment
from ..outcome import Usage

__all__ = ["Known", "Pricer", "Pricing", "cost_of"]

# Prices a usage, USD; None: no usage, or no price known.
Pricer = Callable[[Usage | None], float | None]
# A deployment's entry in ``Pricing.known``: itself, its pricer, its input and output prices.
Known = tuple[Deployment, Pricer, float, float]

log = logging.getLogger("aioproxy")

_MILLION = 1_000_000
# aioproxy provider name -> genai-prices provider id (others: genai-prices guesses from the model)
_PROVIDERS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "azure": "azure",
    "bedrock": "aws",  # its model ids (anthropic.claude-..., amazon.nova-...) are AWS's names
    "groq": "groq",
    "mistral": "mistral",
    "google": "google",
    "gemini": "google",
}


def cost_of(usage: Usage, price: Price) -> float:
    """USD for ``usage`` at ``price`` (per million tokens); cached input at its own rate."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    return (
        (usage.prompt_tokens - cached) * price.input
        + cached * cached_rate
        + usage.completion_tokens * price.output
    ) / _MILLION


def _priced(price: Price, usage: Usage | None) -> float | None:
    return None if usage is None else cost_of(usage, price)


def _unpriced(_usage: Usage | None) -> None:
    return None


_PRICERS_MAX = 4096  # deployments made at run time are not kept for ever


def _table_price(provider: str, model: str) -> Price | None:
    import genai_prices

    provider_id = _PROVIDERS.get(provider)

    def per_million(**tokens: int) -> Decimal:
        usage = genai_prices.Usage(**tokens)
        return genai_prices.calc_price(usage, model, provider_id=provider_id).total_price

    try:
        input_rate = per_million(input_tokens=_MILLION)
        output_rate = per_million(output_tokens=_MILLION)
        cached_rate = per_million(input_tokens=_MILLION, cache_read_tokens=_MILLION)
    except LookupError:
        return None
    return Price(
        input=float(input_rate), output=float(output_rate), cached_input=float(cached_rate)
    )


# The bundled table's rates by (provider, model): the same for every app of a process.
_TABLE: dict[tuple[str, str], Price | None] = {}


class Pricing:
    """Prices by deployment, looked up once each."""

    def __init__(self) -> None:
        self._table = _TABLE
        # What was found for each deployment, by id(deployment) (with the deployment, to tell
        # another one made later at the same id apart): its pricer and its input and output
        # prices (0.0: none known). Read by ``pricer`` and, a dict lookup a request, by the
        # limits' cost estimates.
        self.known: dict[int, Known] = {}

    @staticmethod
    def warm() -> None:
        """Load genai-prices' table in this process now, not on a request."""
        from genai_prices import data_snapshot

        data_snapshot.get_snapshot()

    async def preload(self, deployments: Iterable[Deployment]) -> None:
        """The table's rates for ``deployments`` (those without a configured price), read by
        a child process; on any failure they are looked up here when first needed."""
        keys = sorted(
            {(d.provider, d.model) for d in deployments if d.price is None} - self._table.keys()
        )
        if not keys:
            return
        if "genai_prices" in sys.modules:  # loaded here already (by a lookup): no child needed
            for key in keys:
                self._table[key] = _table_price(*key)
            return
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await child.communicate(json.dumps(keys).encode())
            rates = json.loads(out) if child.returncode == 0 else None
        except (OSError, ValueError) as exc:
            log.warning("reading prices in a child process failed (%s): read here instead", exc)
            return
        if not isinstance(rates, list) or len(rates) != len(keys):
            log.warning("reading prices in a child process failed: read here instead")
            return
        for key, rate in zip(keys, rates, strict=True):
            self._table[key] = (
                None if rate is None else Price(input=rate[0], output=rate[1], cached_input=rate[2])
            )

    def price_of(self, deployment: Deployment) -> Price | None:
        if deployment.price is not None:
            return deployment.price
        key = (deployment.provider, deployment.model)
        try:
            return self._table[key]
        except KeyError:
            price = self._table[key] = _table_price(*key)
            if price is None:
                log.info(
                    "no price known for %s: its requests are logged without cost",
                    deployment.describe(),
                )
            return price

    def pricer(self, deployment: Deployment) -> Pricer:
        """``deployment``'s pricer, made once: what the request path hands ``Outcome.pricer``."""
        found = self.known.get(id(deployment))
        if found is None or found[0] is not deployment:
            found = self.find(deployment)
        return found[1]

    def find(self, deployment: Deployment) -> Known:
        """What ``known`` keeps for ``deployment``, made now."""
        if len(self.known) >= _PRICERS_MAX:
            self.known.clear()
        price = self.price_of(deployment)
        found: Known = (
            (deployment, _unpriced, 0.0, 0.0)
            if price is None
            else (deployment, functools.partial(_priced, price), price.input, price.output)
        )
        self.known[id(deployment)] = found
        return found

    def cost(self, usage: Usage, deployment: Deployment | None) -> float | None:
        if deployment is None:
            return None
        price = self.price_of(deployment)
        return None if price is None else cost_of(usage, price)


def _print_rates() -> None:
    """The child's side of :meth:`Pricing.preload`: [[provider, model], ...] on stdin, each
    one's [input, output, cached_input] (or null) on stdout."""
    rates = []
    for provider, model in json.load(sys.stdin):
        price = _table_price(provider, model)
        rates.append(None if price is None else [price.input, price.output, price.cached_input])
    json.dump(rates, sys.stdout)


if __name__ == "__main__":
    _print_rates()

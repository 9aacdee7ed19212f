"""The ``dashboard`` plugin: the operators' web pages at ``/ui`` (``site``), when ``[ui] enabled``.

Only this factory is imported at start-up: the pages, their templates (jinja2) and assets are
imported with the dashboard on, so a gateway that serves no pages does not hold them.
"""

from __future__ import annotations

from ..config import Config

__all__ = ["dashboard"]


def dashboard(config: Config) -> object:
    """The plugin when ``[ui] enabled``; else an object with no hooks (nothing to pay for)."""
    if not config.ui.enabled:
        return _Off()
    from .site import Dashboard

    return Dashboard(config)


class _Off:
    """``[ui] enabled = false``: no routes, no hooks."""

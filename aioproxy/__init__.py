"""aioproxy: a lightweight, fast, OpenAI-compatible LLM gateway."""

from .app import create_app
from .config import Config, ConfigError, Secret, load_config, parse_config
from .context import Call, Deployment, Principal
from .errors import (
    AuthenticationError,
    BadGateway,
    BadRequest,
    GatewayTimeout,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ProxyError,
    RateLimited,
    UpstreamError,
)
from .hookspecs import RegisterProvider, RegisterRoute, hookimpl
from .outcome import Outcome, Usage
from .providers import JSONReply, Provider, Reply, StreamReply
from .routes import ALIASES, Kind

__all__ = [
    "ALIASES",
    "AuthenticationError",
    "BadGateway",
    "BadRequest",
    "Call",
    "Config",
    "ConfigError",
    "Deployment",
    "GatewayTimeout",
    "JSONReply",
    "Kind",
    "ModelNotFound",
    "NotFound",
    "Outcome",
    "PayloadTooLarge",
    "PermissionDenied",
    "Principal",
    "Provider",
    "ProxyError",
    "RateLimited",
    "RegisterProvider",
    "RegisterRoute",
    "Reply",
    "Secret",
    "StreamReply",
    "UpstreamError",
    "Usage",
    "create_app",
    "hookimpl",
    "load_config",
    "parse_config",
]

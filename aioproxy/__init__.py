"""aioproxy: a lightweight, fast, OpenAI-compatible LLM gateway.

Everything a plugin may use is imported here and listed in ``__all__``; every submodule is
internal and may change without notice (the test kit, ``aioproxy.testing``, is public too).
plugins/README.md (section 9) says what each name is for.
"""

from . import fields, translating
from .app import create_app
from .config import Config, ConfigError, Secret, load_config, parse_config
from .context import Call, Deployment, Principal
from .errors import (
    AuthenticationError,
    BadGateway,
    BadRequest,
    ClientDisconnected,
    GatewayTimeout,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ProxyError,
    RateLimited,
    ServerShutdown,
    UpstreamError,
)
from .failures import ErrorReader, openai_error, scrub
from .fields import *  # reading request fields: their names are fields.__all__
from .hookspecs import RegisterProvider, RegisterRoute, hookimpl
from .masking import mask_client_text, mask_keylike
from .outcome import Outcome, Usage
from .providers import Provider, ProviderConfig
from .replies import JSONReply, Reply, StreamReply
from .request_ids import request_id
from .routes import ALIASES, Kind
from .streaming import DONE, data_of, iter_sse, split_events, sse_data, sse_event
from .translating import *  # a translating provider's kit: its names are translating.__all__
from .transport import UpstreamResponse
from .upstream import Upstream

__all__ = [
    "ALIASES",
    "DONE",
    "AuthenticationError",
    "BadGateway",
    "BadRequest",
    "Call",
    "ClientDisconnected",
    "Config",
    "ConfigError",
    "Deployment",
    "ErrorReader",
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
    "ProviderConfig",
    "ProxyError",
    "RateLimited",
    "RegisterProvider",
    "RegisterRoute",
    "Reply",
    "Secret",
    "ServerShutdown",
    "StreamReply",
    "Upstream",
    "UpstreamError",
    "UpstreamResponse",
    "Usage",
    "create_app",
    "data_of",
    "hookimpl",
    "iter_sse",
    "load_config",
    "mask_client_text",
    "mask_keylike",
    "openai_error",
    "parse_config",
    "request_id",
    "scrub",
    "split_events",
    "sse_data",
    "sse_event",
]
__all__ += fields.__all__
__all__ += translating.__all__

"""aioproxy: a lightweight, fast, OpenAI-compatible LLM gateway.

Everything a plugin may use is imported here and listed in ``__all__``; every submodule is
internal and may change without notice (the test kit, ``aioproxy.testing``, is public too).
"""

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
from .fields import (
    ABSENT,
    BOOL,
    FLOAT,
    INT,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_STOP,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    NULL,
    STR,
    ArrayOf,
    decode_field,
    get_field,
    raw_fields,
    text_or_array,
)
from .hookspecs import RegisterProvider, RegisterRoute, hookimpl
from .outcome import Outcome, Usage
from .providers import Provider, ProviderConfig
from .replies import JSONReply, Reply, StreamReply
from .routes import ALIASES, Kind
from .streaming import DONE, data_of, iter_sse, split_events, sse_data, sse_event
from .transport import UpstreamResponse
from .upstream import ErrorReader, Upstream, openai_error, scrub

__all__ = [
    # app and config
    "ALIASES",
    "Config",
    "ConfigError",
    "Kind",
    "Secret",
    "create_app",
    "load_config",
    "parse_config",
    # hooks
    "RegisterProvider",
    "RegisterRoute",
    "hookimpl",
    # what hooks and providers see
    "Call",
    "Deployment",
    "Outcome",
    "Principal",
    "Usage",
    # providers
    "ErrorReader",
    "JSONReply",
    "Provider",
    "ProviderConfig",
    "Reply",
    "StreamReply",
    "Upstream",
    "UpstreamResponse",
    "openai_error",
    "scrub",
    # reading request fields (each decoded from its bytes, arrays counted first)
    "ABSENT",
    "BOOL",
    "FLOAT",
    "INT",
    "MAX_CONTENT_PARTS",
    "MAX_MESSAGES",
    "MAX_STOP",
    "MAX_TOOLS",
    "MAX_TOOL_CALLS",
    "NULL",
    "STR",
    "ArrayOf",
    "decode_field",
    "get_field",
    "raw_fields",
    "text_or_array",
    # SSE helpers
    "DONE",
    "data_of",
    "iter_sse",
    "split_events",
    "sse_data",
    "sse_event",
    # errors
    "AuthenticationError",
    "BadGateway",
    "BadRequest",
    "GatewayTimeout",
    "ModelNotFound",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProxyError",
    "RateLimited",
    "UpstreamError",
]

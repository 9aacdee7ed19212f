"""The configuration: msgspec Structs decoded from TOML, with ``${VAR}`` taken from the environment."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "AuthConfig",
    "CacheConfig",
    "CompletionsConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelEntry",
    "ModelRouting",
    "Price",
    "ResponsesConfig",
    "RouterConfig",
    "Secret",
    "ServerConfig",
    "SpendConfig",
    "StateConfig",
    "TimeoutOverrides",
    "Timeouts",
    "UIConfig",
    "UpstreamConfig",
    "VirtualKey",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.toml")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the source, the field and the problem."""


class Secret(str):
    """A key or token: a plain ``str`` to code that uses it, masked wherever it is printed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"


class Base(
    msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Config tables: keyword-only, immutable, and strict, so a misspelt key is an error, not a no-op."""


PositiveFloat = Annotated[float, Meta(gt=0)]


class VirtualKey(Base, frozen=True):
    """A client key; ``models`` limits it to those model names (all when absent)."""

    key: Secret
    name: str | None = None
    models: list[str] | None = None


class AuthConfig(Base, frozen=True):
    master_key: Secret | None = None
    keys: list[VirtualKey] = []


class Timeouts(Base, frozen=True):
    """Upstream timeouts in seconds.

    ``connect``: opening the connection. ``first_byte``: from sending the request to the answer's
    first byte (a stream's first event); unset, ``read`` bounds it. ``read``: the longest silence
    while reading, and the longest a stream may go without a complete event (progress is counted
    in events, so an upstream trickling bytes cannot hold a stream). ``total``: the whole call,
    stream included.
    """

    connect: PositiveFloat = 10.0
    first_byte: PositiveFloat | None = None
    read: PositiveFloat = 120.0
    total: PositiveFloat | None = None


class TimeoutOverrides(Base, frozen=True):
    """A deployment's own timeouts; each one left out is ``[upstream.timeouts]``'s."""

    connect: PositiveFloat | None = None
    first_byte: PositiveFloat | None = None
    read: PositiveFloat | None = None
    total: PositiveFloat | None = None

    def over(self, defaults: Timeouts) -> Timeouts:
        changes = {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not None}
        return msgspec.structs.replace(defaults, **changes) if changes else defaults


class Price(Base, frozen=True):
    """A deployment's own price, USD per million tokens: it overrides the bundled price table."""

    input: Annotated[float, Meta(ge=0)]
    output: Annotated[float, Meta(ge=0)] = 0.0
    cached_input: Annotated[float, Meta(ge=0)] | None = None  # None: the input price


# The endpoint kinds a provider serves (aioproxy.routes.PROVIDER_KINDS), as config spells them.
EndpointKind = Literal[
    "chat_completions", "responses", "completions", "embeddings", "messages", "count_tokens"
]


class ModelEntry(Base, frozen=True):
    """One deployment: the model ``name`` clients send, served by ``provider`` as ``model`` upstream."""

    name: Annotated[str, Meta(min_length=1)]
    provider: Annotated[str, Meta(min_length=1)]
    model: str | None = None
    api_base: str | None = None
    api_key: Secret | None = None
    weight: Annotated[float, Meta(ge=0)] = 1.0
    rpm: Annotated[int, Meta(ge=1)] | None = None  # requests a minute, over which it is skipped
    tpm: Annotated[int, Meta(ge=1)] | None = None  # tokens a minute, likewise
    timeouts: TimeoutOverrides | None = None
    headers: dict[str, Secret] = {}  # may hold tokens: masked when printed
    settings: dict[str, Any] = {}
    # The endpoint kinds the upstream serves itself (None: all its provider implements). The
    # rest are bridged onto chat completions where that is native, e.g. for a server without
    # /v1/responses: ["chat_completions", "embeddings"].
    endpoints: Annotated[list[EndpointKind], Meta(min_length=1)] | None = None
    price: Price | None = None  # for spend; None: the bundled price table's (genai-prices)
    # The upstream model takes ``reasoning_effort`` (and max_completion_tokens): the Messages
    # bridge maps Anthropic's ``thinking`` onto it; otherwise ``thinking`` is ignored.
    reasoning: bool = False


class ServerConfig(Base, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 4000
    max_body_size: Annotated[int, Meta(ge=1024)] = 32 * 1024 * 1024
    body_timeout: PositiveFloat = 60.0  # reading a request body; slower clients get 408
    # A connection whose request headers are not complete this long after it opened (or after
    # its last answer) is closed: slow-header clients cannot hold connections open.
    header_timeout: PositiveFloat = 30.0
    # While a stream waits for its first event, send an SSE comment this often (seconds) so that
    # load balancers' idle timeouts do not cut it; 0 disables.
    keepalive_interval: Annotated[float, Meta(ge=0)] = 15.0
    shutdown_grace: Annotated[float, Meta(ge=0)] = 30.0  # for in-flight requests on SIGTERM
    # Browser origins ("https://app.example.com", or "*") that may call the API from their
    # pages: they get CORS answers, preflights included. Any other cross-site browser request
    # (an Origin header naming another site) is refused, so a web page cannot spend the credits.
    cors_origins: list[str] = []
    # Open mode (no keys) answers only requests whose Host names a loopback address, `host` or
    # one of these names ("*": any), so a page cannot reach it by DNS rebinding.
    allowed_hosts: list[str] = []
    # Add x-aioproxy-overhead-ms to every answer: the milliseconds the gateway itself spent
    # (total minus the upstream's time), for operators tuning it; off, it costs nothing.
    timing_header: bool = False


Strategy = Literal["weighted", "least-busy", "latency"]


class ModelRouting(Base, frozen=True):
    """Per-model overrides of the ``[router]`` defaults."""

    strategy: Strategy | None = None
    num_retries: Annotated[int, Meta(ge=0, le=10)] | None = None
    fallbacks: list[str] | None = None
    context_window_fallbacks: list[str] | None = None


class RouterConfig(Base, frozen=True):
    """Choosing among a model's deployments, retrying, falling back and cooling down."""

    strategy: Strategy = "weighted"
    num_retries: Annotated[int, Meta(ge=0, le=10)] = 2
    retry_backoff: Annotated[float, Meta(ge=0)] = 0.05  # seconds before the first retry; doubles
    retry_backoff_max: Annotated[float, Meta(ge=0)] = 2.0
    retry_after_max: Annotated[float, Meta(ge=0)] = 10.0  # longest upstream retry-after honoured
    cooldown_failures: Annotated[int, Meta(ge=1)] = 3  # failures within cooldown_window ...
    cooldown_window: PositiveFloat = 30.0
    cooldown_seconds: Annotated[float, Meta(ge=0)] = 30.0  # ... skip the deployment this long
    # Model name -> other model names to try, in order, when all its deployments fail.
    fallbacks: dict[str, list[str]] = {}
    # Likewise, when the request is too long for the model's context window.
    context_window_fallbacks: dict[str, list[str]] = {}
    models: dict[str, ModelRouting] = {}


class UpstreamConfig(Base, frozen=True):
    timeouts: Timeouts = Timeouts()
    # Client headers copied to the upstream call (any case); everything else stays behind.
    # Credentials and hop-by-hop headers are refused here (see aioproxy.headers).
    forward_headers: list[str] = msgspec.field(
        default_factory=lambda: ["openai-beta", "x-request-id"]
    )
    # Open upstream connections at most (0: no cap), for each of the app's two clients: the
    # lean pool that pass-through calls use, and the ClientSession of the other plugins.
    max_connections: Annotated[int, Meta(ge=0)] = 0
    # Bytes of upstream answers held in memory at once, gateway-wide (bodies being read,
    # unfinished stream events): a request that would go past it fails with a 503 while the
    # others go on (0: no bound). Each answer is also capped on its own (64 MiB, events 16 MiB).
    max_buffered_bytes: Annotated[int, Meta(ge=0)] = 256 * 1024 * 1024


class ResponsesConfig(Base, frozen=True):
    """The Responses API bridge's store: ``store: true`` responses, kept in the control plane's
    database (``[database] url``)."""

    # Deprecated and ignored (stored responses live in ``[database] url``; a warning says so):
    # responses kept in the old file are not carried over.
    store_path: str | None = None
    store: bool = True  # False: never store, whatever the request says
    # Seconds a response is kept after it was created or last chained onto (OpenAI: 30 days).
    ttl: PositiveFloat | None = 30 * 24 * 3600.0
    # Bytes of stored responses beyond which the least recently used are deleted (None: no bound).
    max_bytes: Annotated[int, Meta(ge=1)] | None = 1 << 30
    # Seconds between two runs of the cleanup that enforces ttl and max_bytes, off the request path.
    cleanup_interval: PositiveFloat = 300.0


class CompletionsConfig(Base, frozen=True):
    """Legacy ``/v1/completions`` on chat-only providers (the bridge): a chat call per prompt."""

    # Prompts one request may carry. OpenAI's spec bounds no prompt list; 2048 is its bound on
    # the other batched input (embeddings ``input``), so no request written for OpenAI is refused.
    max_prompts: Annotated[int, Meta(ge=1)] = 2048
    # A request's chat calls in flight at once: one large list cannot crowd out other callers.
    concurrency: Annotated[int, Meta(ge=1)] = 8


class MetricsConfig(Base, frozen=True):
    """Prometheus ``/metrics`` (aioproxy.observability.metrics)."""

    # Off by default: counting costs CPU on every request; operators who scrape turn it on.
    enabled: bool = False
    # Without the master key: for a scraper on a private network. Otherwise /metrics needs it.
    public: bool = False
    # Serve /metrics on this port only (no key needed there), not on the API's port.
    port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    host: str = "127.0.0.1"  # the address of that port


class LoggingConfig(Base, frozen=True):
    """The ``aioproxy.access`` log: one line per finished request."""

    # Off by default: a line per request costs CPU; turn it on to get one.
    access_log: bool = False
    format: Literal["text", "json"] = "text"  # run.py's --log-format overrides it


class DatabaseConfig(Base, frozen=True):
    """Where keys, teams, spend and the request log live (aioproxy.control)."""

    # sqlite:///relative/path (to the working directory), sqlite:////absolute/path, or
    # postgresql://user:password@host/db; "${VAR}" is expanded like everywhere else.
    url: Annotated[str, Meta(min_length=1)] = "sqlite:///aioproxy.sqlite3"
    # Seconds between two looks at the database for what other instances changed (keys,
    # teams, spend): a change made elsewhere applies here within this long.
    poll_interval: PositiveFloat = 2.0
    # Output tokens a request with no max_tokens / max_completion_tokens / max_output_tokens
    # is assumed to spend, for the cost it reserves against a key's or team's budget while
    # in flight (priced at its deployment's output rate; the real cost replaces it after).
    budget_output_tokens: Annotated[int, Meta(ge=0)] = 4096
    # PostgreSQL: the longest a statement may run or wait for a lock (seconds; 0: no bound),
    # PostgreSQL's own statement_timeout and lock_timeout, set in each transaction. A lock
    # another session holds then fails the statement instead of holding it: the request log
    # keeps its rows and tries again, the admin API answers 503, and a shutdown gives up on
    # the log once it has written nothing for this long (a silent server). (SQLite waits for
    # a lock its own busy timeout, 5 s, and a shutdown for its log.)
    statement_timeout: Annotated[float, Meta(ge=0, le=2_147_483)] = 30.0  # PostgreSQL's most


class SpendConfig(Base, frozen=True):
    """The request log and its writer, off the request path."""

    log: bool = True  # one row per request in the database (spend needs it)
    retention_days: PositiveFloat | None = 90.0  # older rows are deleted (None: kept for ever)
    flush_interval: PositiveFloat = 1.0  # seconds between two batched writes
    batch_size: Annotated[int, Meta(ge=1)] = 1000  # rows that trigger a write at once
    # Rows held while the database is unreachable; beyond it the oldest are dropped (counted).
    buffer_rows: Annotated[int, Meta(ge=1)] = 100_000


class UIConfig(Base, frozen=True):
    """The operators' dashboard at ``/ui`` (aioproxy.ui)."""

    # Off by default: a gateway serves no web pages unless asked (the embedded default turns it on).
    enabled: bool = False
    # Seconds a sign-in lasts; the session cookie expires then, whatever the browser does.
    session_ttl: Annotated[float, Meta(gt=0, le=30 * 86400)] = 8 * 3600.0
    # Signs the session cookies. Unset: derived from the master key (stable across restarts and
    # --workers), else random per process (sessions then end on restart and stay per worker).
    session_secret: Secret | None = None
    # Failed sign-ins a client address may make in ``signin_window`` seconds; then 429 until
    # the oldest leaves the window (per process, in memory).
    signin_attempts: Annotated[int, Meta(ge=1)] = 10
    signin_window: Annotated[float, Meta(gt=0)] = 300.0


class StateConfig(Base, frozen=True):
    """State shared by every instance pointing at one Redis (aioproxy.state): key and team
    counters, deployment cooldown, key changes, the response cache."""

    # redis://[:password@]host:port/db or rediss:// (TLS); "${VAR}" is expanded. None: every
    # counter is per process (one process only: --workers N > 1 with limits refuses to start).
    redis_url: Secret | None = None
    # Seconds a Redis call may take before the request goes on without it (per-process
    # counters meanwhile): a slow or lost Redis never holds a request.
    timeout: PositiveFloat = 1.0
    # While Redis is unreachable: "open" serves limited keys on per-process counters,
    # "closed" refuses them (429) until it is back.
    on_error: Literal["open", "closed"] = "open"
    # Connections to Redis per process; a request waits (within ``timeout``) for a free one.
    max_connections: Annotated[int, Meta(ge=1)] = 64
    prefix: Annotated[str, Meta(min_length=1)] = "aioproxy"  # of every Redis key and channel


class CacheConfig(Base, frozen=True):
    """The response cache (aioproxy.cache): in memory, or in Redis when [state] redis_url is set."""

    enabled: bool = False
    ttl: PositiveFloat = 3600.0  # seconds an answer is kept
    ttl_per_model: dict[str, PositiveFloat] = {}  # model name -> its own ttl
    # Whose answers a request may receive: the same key's, the same team's, or anyone's.
    scope: Literal["key", "team", "global"] = "key"
    # Requests with temperature > 0 (or none: OpenAI's default is 1) vary by design: cached
    # only when this says so.
    cache_sampled: bool = False
    # Beyond these the least recently used go (in memory), or the oldest written (in Redis,
    # across every instance).
    max_entries: Annotated[int, Meta(ge=1)] = 10_000
    max_bytes: Annotated[int, Meta(ge=1)] = 256 * 1024 * 1024  # of answers
    max_entry_bytes: Annotated[int, Meta(ge=1)] = 4 * 1024 * 1024  # bigger answers are not kept


class PluginsConfig(Base, frozen=True):
    strict: bool = False
    disable: list[str] = []


class Config(Base, frozen=True):
    auth: AuthConfig = AuthConfig()
    models: list[ModelEntry] = []
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    router: RouterConfig = RouterConfig()
    plugins: PluginsConfig = PluginsConfig()
    responses: ResponsesConfig = ResponsesConfig()
    completions: CompletionsConfig = CompletionsConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    database: DatabaseConfig = DatabaseConfig()
    spend: SpendConfig = SpendConfig()
    ui: UIConfig = UIConfig()

    state: StateConfig = StateConfig()
    cache: CacheConfig = CacheConfig()
    # Extra paths per endpoint kind, e.g. chat_completions = ["/openai/v1/chat/completions"].
    aliases: dict[str, list[str]] = {}


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, where: str, env: Mapping[str, str]) -> Any:
    """Replace ``${VAR}`` in every string of ``value``; ``where`` is the field path for errors."""
    if isinstance(value, str):
        if "${" not in value:
            return value

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                raise ConfigError(f"environment variable {name} is not set (at `{where}`)")
            return env[name]

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}", env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", env) for i, v in enumerate(value)]
    return value


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Secret:
        if isinstance(obj, str):
            return Secret(obj)
        raise TypeError(f"Expected `str`, got `{type(obj).__name__}`")
    raise NotImplementedError


def parse_config(
    raw: Mapping[str, Any], source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Build a Config from a decoded TOML/JSON mapping."""
    try:
        expanded = _expand(dict(raw), "$", os.environ if env is None else env)
        config = msgspec.convert(expanded, Config, dec_hook=_dec_hook)
    except (ConfigError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check(config, source)
    return config


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and check the TOML file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(raw, str(path), env)


def _check_key_names(auth: AuthConfig, source: str) -> None:
    """Key names are unique: logs and plugins tell keys apart by them (as config_auth names
    them: "master", then each key's ``name`` or ``key-<i>``)."""
    generated = {f"key-{i}" for i, vkey in enumerate(auth.keys) if vkey.name is None}
    named: set[str] = set()
    for i, vkey in enumerate(auth.keys):
        name = vkey.name
        if name is None:
            continue
        if name == "master":
            problem = "is the master key's"
        elif name in generated:
            problem = "is the name of an unnamed key"
        elif name in named:
            problem = "is taken by an earlier key"
        else:
            named.add(name)
            continue
        raise ConfigError(f"{source}: the key name {name!r} {problem} - at `$.auth.keys[{i}].name`")


def _check(config: Config, source: str) -> None:
    """Cross-field checks that msgspec's per-field constraints cannot express."""
    from .headers import never_forwarded
    from .routes import KINDS  # routes does not import config: no cycle at import time

    if config.auth.master_key is not None and not config.auth.master_key.strip():
        raise ConfigError(f"{source}: the master key is empty - at `$.auth.master_key`")
    for i, vkey in enumerate(config.auth.keys):
        if not vkey.key.strip():
            raise ConfigError(f"{source}: the key is empty - at `$.auth.keys[{i}].key`")
    _check_key_names(config.auth, source)

    for i, name in enumerate(config.upstream.forward_headers):
        if reason := never_forwarded(name):
            raise ConfigError(
                f"{source}: '{name}' is {reason}, never forwarded to an upstream"
                f" - at `$.upstream.forward_headers[{i}]`"
            )

    for kind, paths in config.aliases.items():
        if kind not in KINDS:
            raise ConfigError(
                f"{source}: unknown endpoint kind {kind!r} - at `$.aliases`; "
                f"expected one of {', '.join(KINDS)}"
            )
        for i, path in enumerate(paths):
            if not path.startswith("/"):
                raise ConfigError(
                    f"{source}: alias path must start with '/' - at `$.aliases.{kind}[{i}]`"
                )

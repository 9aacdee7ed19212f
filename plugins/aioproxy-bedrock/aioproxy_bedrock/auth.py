"""How a request to Bedrock is authorized: SigV4 by botocore's signer, or a Bedrock API key.

Credentials come from the deployment (``aws_access_key_id`` with ``api_key`` as the secret key),
else from the standard AWS chain through botocore (environment, a ``profile`` of the shared
files, SSO, container and instance roles). Temporary ones are refreshed before they expire, by
botocore, in a thread: a refresh may read files or call AWS, which must not stall the loop.
botocore is imported here, inside functions, so that an app that never serves Bedrock never
loads it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from aioproxy import ConfigError

__all__ = ["BearerAuth", "SigV4Signer", "load_credentials", "load_region", "sign_request"]

SERVICE = "bedrock"  # SigV4's service name for bedrock-runtime


def load_credentials(access_key_id: str | None, secret_key: str | None, profile: str | None) -> Any:
    """botocore credentials: static ones given, else the standard chain's. Blocking (files, and
    the chain may call AWS): run it in a thread. Raises ConfigError when none are found."""
    from botocore.credentials import Credentials
    from botocore.session import Session

    if access_key_id:
        if not secret_key:
            raise ConfigError("aws_access_key_id needs the secret access key as api_key")
        return Credentials(access_key_id, secret_key)
    credentials = Session(profile=profile).get_credentials()
    if credentials is None:
        raise ConfigError(
            "no AWS credentials found (environment, shared files, SSO, container or instance "
            "role); set them, or give aws_access_key_id with api_key, or api_key alone"
        )
    return credentials


def load_region(profile: str | None) -> str | None:
    """The region the AWS configuration names (``AWS_REGION``, which the AWS SDKs read and
    botocore does not, then ``AWS_DEFAULT_REGION`` or the profile's); blocking (reads files)."""
    from botocore.session import Session

    region: str | None = os.environ.get("AWS_REGION") or Session(
        profile=profile
    ).get_config_variable("region")
    return region


class _NoSigningDetails(logging.Filter):
    """Drops botocore's DEBUG records of each signature, its string to sign and canonical
    request: the latter holds the session token, and a signature can be replayed for minutes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


def quiet_signing_logs() -> None:
    """Keep signing details out of the logs, whatever level the app logs at (idempotent)."""
    logger = logging.getLogger("botocore.auth")
    if not any(isinstance(f, _NoSigningDetails) for f in logger.filters):
        logger.addFilter(_NoSigningDetails())


def sign_request(
    credentials: Any,
    region: str,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    method: str = "POST",
    service: str = SERVICE,
) -> dict[str, str]:
    """``headers`` and SigV4's (``Authorization``, ``X-Amz-Date``, ``X-Amz-Security-Token``),
    every one of ``headers`` signed along with the host, by botocore at the current time."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    SigV4Auth(credentials, service, region).add_auth(request)
    return dict(request.headers.items())


class SigV4Signer:
    """Signs requests with one set of credentials for one region; refreshes them when due."""

    __slots__ = ("credentials", "region")

    def __init__(self, credentials: Any, region: str) -> None:
        self.credentials = credentials
        self.region = region
        quiet_signing_logs()

    async def headers(self, url: str, body: bytes, headers: Mapping[str, str]) -> dict[str, str]:
        """``headers`` with the signature's."""
        credentials = self.credentials
        # Only temporary credentials expire; botocore says when a refresh is due (its clock).
        refresh_needed = getattr(credentials, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            frozen = await asyncio.to_thread(credentials.get_frozen_credentials)
        else:
            frozen = credentials.get_frozen_credentials()
        return sign_request(frozen, self.region, url, body, headers)


class BearerAuth:
    """A Bedrock API key, sent as a bearer token: nothing to sign."""

    __slots__ = ("_authorization",)

    def __init__(self, api_key: str) -> None:
        self._authorization = f"Bearer {api_key}"

    async def headers(self, url: str, body: bytes, headers: Mapping[str, str]) -> dict[str, str]:
        return {**headers, "Authorization": self._authorization}

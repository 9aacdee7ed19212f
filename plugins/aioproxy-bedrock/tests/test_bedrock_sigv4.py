"""The plugin's signing (``auth.sign_request``, botocore's SigV4Auth underneath) against AWS's
published Signature Version 4 test suite.

Vectors from AWS's "Signature Version 4 test suite" (docs.aws.amazon.com/general/latest/gr/
signature-v4-test-suite.html; the same files as awslabs/aws-c-auth tests/aws-signing-test-suite/
v4/<name>/): each request's header-signed Authorization, signed at 20150830T123600Z by key id
AKIDEXAMPLE for region us-east-1 and service "service".
"""

from __future__ import annotations

import datetime
import threading
from typing import Any

import pytest
from aioproxy_bedrock.auth import SigV4Signer, sign_request
from botocore.credentials import Credentials

ACCESS_KEY_ID = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SCOPE = "Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request"
AT = datetime.datetime(2015, 8, 30, 12, 36)  # botocore's clock gives naive UTC

VECTORS = [  # name, method, url, headers, body, signed headers, signature
    (
        "get-vanilla",
        "GET",
        "https://example.amazonaws.com/",
        {},
        b"",
        "host;x-amz-date",
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
    (
        "get-vanilla-query-order-key-case",
        "GET",
        "https://example.amazonaws.com/?Param2=value2&Param1=value1",
        {},
        b"",
        "host;x-amz-date",
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    ),
    (
        "post-vanilla",
        "POST",
        "https://example.amazonaws.com/",
        {},
        b"",
        "host;x-amz-date",
        "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
    ),
    (
        "post-x-www-form-urlencoded",
        "POST",
        "https://example.amazonaws.com/",
        {"Content-Type": "application/x-www-form-urlencoded"},
        b"Param1=value1",
        "content-type;host;x-amz-date",
        "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
    ),
]


@pytest.fixture
def at_the_suites_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore signs at its current time; the suite's signatures are of one instant."""
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: AT)


@pytest.mark.parametrize(
    ("method", "url", "headers", "body", "signed", "signature"),
    [pytest.param(*vector[1:], id=vector[0]) for vector in VECTORS],
)
def test_the_published_vectors(
    at_the_suites_time: None,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    signed: str,
    signature: str,
) -> None:
    credentials = Credentials(ACCESS_KEY_ID, SECRET_KEY)
    out = sign_request(
        credentials, "us-east-1", url, body, headers, method=method, service="service"
    )
    assert out["X-Amz-Date"] == "20150830T123600Z"
    assert out["Authorization"] == (
        f"AWS4-HMAC-SHA256 {SCOPE}, SignedHeaders={signed}, Signature={signature}"
    )
    assert "X-Amz-Security-Token" not in out


def test_a_session_token_is_sent_and_signed(at_the_suites_time: None) -> None:
    credentials = Credentials(ACCESS_KEY_ID, SECRET_KEY, "session-token")
    out = sign_request(credentials, "us-east-1", "https://example.amazonaws.com/", b"", {})
    assert out["X-Amz-Security-Token"] == "session-token"
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in out["Authorization"]
    assert "/us-east-1/bedrock/aws4_request" in out["Authorization"]  # Bedrock's service name


class _Expiring:
    """Stands for botocore's RefreshableCredentials: due for a refresh until refreshed."""

    def __init__(self) -> None:
        self.due = True
        self.refreshed_in: list[Any] = []

    def refresh_needed(self) -> bool:
        return self.due

    def get_frozen_credentials(self) -> Credentials:
        self.refreshed_in.append(threading.current_thread())
        self.due = False
        return Credentials(ACCESS_KEY_ID, SECRET_KEY).get_frozen_credentials()


async def test_a_refresh_runs_in_a_thread_not_on_the_loop() -> None:
    credentials = _Expiring()
    signer = SigV4Signer(credentials, "us-east-1")
    await signer.headers("https://example.amazonaws.com/", b"", {})
    assert credentials.refreshed_in[0] is not threading.main_thread()  # may read files or call AWS
    await signer.headers("https://example.amazonaws.com/", b"", {})
    assert credentials.refreshed_in[1] is threading.main_thread()  # not due: no thread needed

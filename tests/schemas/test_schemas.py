"""The OpenAI schema fixture validates realistic bodies and rejects broken ones."""

from __future__ import annotations

import copy
import json

import pytest
from jsonschema import Draft202012Validator, ValidationError

from . import SCHEMA_FILE, schema_names, validate, validator

# --------------------------------------------------------------------------
# Realistic bodies, shaped like what api.openai.com returns.
# --------------------------------------------------------------------------

CHAT_COMPLETION = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4.1-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I assist you today?",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_3a668b2eb1",
}

CHAT_COMPLETION_TOOL_CALL = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "created": 1699896916,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": '{\n"location": "Boston, MA"\n}',
                        },
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99},
}

CHAT_CHUNK_FIRST = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ],
}

CHAT_CHUNK_LAST = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
    "usage": None,
}

CHAT_CHUNK_USAGE = {  # stream_options={"include_usage": true}: final chunk
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini",
    "choices": [],
    "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
}

CHAT_CHUNK_TOOL_CALL = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"loc'}}]},
            "finish_reason": None,
        }
    ],
}

COMPLETION = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [
        {
            "text": "\n\nThis is indeed a test",
            "index": 0,
            "logprobs": None,
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

EMBEDDINGS = {
    "object": "list",
    "data": [
        {"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, 0.015797347]},
        {"object": "embedding", "index": 1, "embedding": [-0.0028842222, 0.01, 0]},
    ],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}

MODELS = {
    "object": "list",
    "data": [
        {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"},
        {"id": "my-org/local-llama", "object": "model", "created": 0, "owned_by": "aioproxy"},
    ],
}

ERROR = {
    "error": {
        "message": "Incorrect API key provided: sk-abc. You can find your API key at ...",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}

RESPONSE = {
    "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    "object": "response",
    "created_at": 1741476542,
    "status": "completed",
    "completed_at": 1741476543,
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "model": "gpt-4.1-2025-04-14",
    "output": [
        {
            "type": "message",
            "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
            "status": "completed",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": "In a peaceful grove beneath a silver moon...",
                    "annotations": [],
                    "logprobs": [],
                }
            ],
        }
    ],
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None},
    "service_tier": "default",
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}, "verbosity": "medium"},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "usage": {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 123,
    },
    "metadata": {},
}

RESPONSE_FUNCTION_CALL = {
    **RESPONSE,
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "function_call",
            "id": "fc_12345xyz",
            "call_id": "call_12345xyz",
            "name": "get_weather",
            "arguments": '{"location":"Paris, France"}',
            "status": "completed",
        },
    ],
    "reasoning": {"effort": "medium", "summary": None},
    "tools": [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Get current temperature for a given location.",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
                "additionalProperties": False,
            },
            "strict": True,
        }
    ],
}

RESPONSE_IN_PROGRESS = {  # as in response.created; note: usage omitted, not null
    **{k: v for k, v in RESPONSE.items() if k not in ("usage", "completed_at")},
    "status": "in_progress",
    "output": [],
}

EVENT_CREATED = {"type": "response.created", "sequence_number": 0, "response": RESPONSE_IN_PROGRESS}
EVENT_ITEM_ADDED = {
    "type": "response.output_item.added",
    "sequence_number": 2,
    "output_index": 0,
    "item": {
        "type": "message",
        "id": "msg_1",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    },
}
EVENT_PART_ADDED = {
    "type": "response.content_part.added",
    "sequence_number": 3,
    "item_id": "msg_1",
    "output_index": 0,
    "content_index": 0,
    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
}
EVENT_TEXT_DELTA = {
    "type": "response.output_text.delta",
    "sequence_number": 4,
    "item_id": "msg_1",
    "output_index": 0,
    "content_index": 0,
    "delta": "In",
    "logprobs": [],
}
EVENT_TEXT_DONE = {
    "type": "response.output_text.done",
    "sequence_number": 5,
    "item_id": "msg_1",
    "output_index": 0,
    "content_index": 0,
    "text": "In a peaceful grove beneath a silver moon...",
    "logprobs": [],
}
EVENT_COMPLETED = {"type": "response.completed", "sequence_number": 9, "response": RESPONSE}
EVENT_ERROR = {
    "type": "error",
    "sequence_number": 1,
    "code": "server_error",
    "message": "The server had an error while processing your request.",
    "param": None,
}

VALID = [
    ("CreateChatCompletionResponse", CHAT_COMPLETION),
    ("CreateChatCompletionResponse", CHAT_COMPLETION_TOOL_CALL),
    ("CreateChatCompletionStreamResponse", CHAT_CHUNK_FIRST),
    ("CreateChatCompletionStreamResponse", CHAT_CHUNK_LAST),
    ("CreateChatCompletionStreamResponse", CHAT_CHUNK_USAGE),
    ("CreateChatCompletionStreamResponse", CHAT_CHUNK_TOOL_CALL),
    ("CreateCompletionResponse", COMPLETION),
    ("CreateEmbeddingResponse", EMBEDDINGS),
    ("ListModelsResponse", MODELS),
    ("Model", MODELS["data"][0]),
    ("ErrorResponse", ERROR),
    ("Error", ERROR["error"]),
    ("Response", RESPONSE),
    ("Response", RESPONSE_FUNCTION_CALL),
    ("Response", RESPONSE_IN_PROGRESS),
    ("ResponseStreamEvent", EVENT_CREATED),
    ("ResponseStreamEvent", EVENT_ITEM_ADDED),
    ("ResponseStreamEvent", EVENT_PART_ADDED),
    ("ResponseStreamEvent", EVENT_TEXT_DELTA),
    ("ResponseStreamEvent", EVENT_TEXT_DONE),
    ("ResponseStreamEvent", EVENT_COMPLETED),
    ("ResponseStreamEvent", EVENT_ERROR),
    ("ResponseTextDeltaEvent", EVENT_TEXT_DELTA),
    ("ResponseCompletedEvent", EVENT_COMPLETED),
]


@pytest.mark.parametrize(
    ("schema_name", "instance"),
    VALID,
    ids=[f"{name}-{i}" for i, (name, _) in enumerate(VALID)],
)
def test_valid_bodies_pass(schema_name, instance):
    validate(schema_name, instance)


# --------------------------------------------------------------------------
# Broken variants: (schema, base body, path to change, new value or DELETE,
# expected error json_path, expected message fragment).
# --------------------------------------------------------------------------

DELETE = object()
CHAT, CHUNK = "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"
COMPL, EMBED = "CreateCompletionResponse", "CreateEmbeddingResponse"
MODELS_, ERR = "ListModelsResponse", "ErrorResponse"
RESP, EVENT = "Response", "ResponseStreamEvent"

INVALID = [
    # chat.completion
    (CHAT, CHAT_COMPLETION, ["choices"], DELETE, "$", "'choices' is a required"),
    (CHAT, CHAT_COMPLETION, ["created"], "1741569952", "$.created", "not of type 'integer'"),
    (CHAT, CHAT_COMPLETION, ["object"], "chat.completion.chunk", "$.object", "is not one of"),
    (
        CHAT,
        CHAT_COMPLETION,
        ["choices", 0, "message", "role"],
        "user",
        "$.choices[0].message.role",
        "is not one of",
    ),
    (
        CHAT,
        CHAT_COMPLETION,
        ["usage", "total_tokens"],
        DELETE,
        "$.usage",
        "'total_tokens' is a required",
    ),
    (
        CHAT,
        CHAT_COMPLETION_TOOL_CALL,
        ["choices", 0, "message", "tool_calls", 0, "function", "arguments"],
        {"location": "Boston"},
        "$.choices[0].message.tool_calls[0].function.arguments",
        "not of type 'string'",
    ),
    # chat.completion.chunk
    (
        CHUNK,
        CHAT_CHUNK_FIRST,
        ["choices", 0, "delta"],
        DELETE,
        "$.choices[0]",
        "'delta' is a required",
    ),
    (
        CHUNK,
        CHAT_CHUNK_FIRST,
        ["choices", 0, "delta", "content"],
        42,
        "$.choices[0].delta.content",
        "42",
    ),
    (
        CHUNK,
        CHAT_CHUNK_LAST,
        ["choices", 0, "finish_reason"],
        "done",
        "$.choices[0].finish_reason",
        "is not one of",
    ),
    # text_completion
    (COMPL, COMPLETION, ["choices", 0, "text"], DELETE, "$.choices[0]", "'text' is a required"),
    # embeddings
    (EMBED, EMBEDDINGS, ["usage"], DELETE, "$", "'usage' is a required"),
    (
        EMBED,
        EMBEDDINGS,
        ["data", 1, "embedding", 0],
        "0.1",
        "$.data[1].embedding[0]",
        "not of type 'number'",
    ),
    # models
    (MODELS_, MODELS, ["data", 0, "owned_by"], DELETE, "$.data[0]", "'owned_by' is a required"),
    (MODELS_, MODELS, ["data"], {"gpt-4o-mini": {}}, "$.data", "not of type 'array'"),
    # errors
    (ERR, ERROR, ["error", "message"], DELETE, "$.error", "'message' is a required"),
    (ERR, ERROR, ["error"], "Incorrect API key", "$.error", "not of type 'object'"),
    # Responses API
    (RESP, RESPONSE, ["output"], DELETE, "$", "'output' is a required"),
    (RESP, RESPONSE, ["status"], "done", "$.status", "is not one of"),
    (
        RESP,
        RESPONSE,
        ["output", 0, "content", 0, "text"],
        None,
        "$.output[0].content[0].text",
        "not of type 'string'",
    ),
    (RESP, RESPONSE, ["output", 0, "status"], "finished", "$.output[0].status", "is not one of"),
    (
        RESP,
        RESPONSE_FUNCTION_CALL,
        ["output", 1, "call_id"],
        DELETE,
        "$.output[1]",
        "'call_id' is a required",
    ),
    (EVENT, EVENT_TEXT_DELTA, ["delta"], DELETE, "$", "'delta' is a required"),
    (EVENT, EVENT_TEXT_DELTA, ["delta"], 5, "$.delta", "not of type 'string'"),
    (
        EVENT,
        EVENT_TEXT_DELTA,
        ["sequence_number"],
        "4",
        "$.sequence_number",
        "not of type 'integer'",
    ),
    (EVENT, EVENT_TEXT_DELTA, ["type"], "response.output_text.deltas", "$", "not valid under any"),
    (EVENT, EVENT_COMPLETED, ["response", "id"], DELETE, "$.response", "'id' is a required"),
    (
        EVENT,
        EVENT_COMPLETED,
        ["response", "usage", "total_tokens"],
        1.5,
        "$.response.usage.total_tokens",
        "not of type 'integer'",
    ),
    (EVENT, EVENT_COMPLETED, ["sequence_number"], DELETE, "$", "'sequence_number' is a required"),
]


def _mutate(instance, path, value):
    broken = copy.deepcopy(instance)
    target = broken
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return broken


@pytest.mark.parametrize(
    ("schema_name", "base", "path", "value", "json_path", "fragment"),
    INVALID,
    ids=[f"{c[0]}-{'.'.join(map(str, c[2]))}-{i}" for i, c in enumerate(INVALID)],
)
def test_broken_bodies_fail(schema_name, base, path, value, json_path, fragment):
    broken = _mutate(base, path, value)
    with pytest.raises(ValidationError) as excinfo:
        validate(schema_name, broken)
    assert excinfo.value.json_path == json_path, excinfo.value
    assert fragment in excinfo.value.message
    validate(schema_name, base)  # the base body itself was not modified


@pytest.mark.parametrize(
    "instance", [None, [], "chat.completion", {}], ids=["null", "list", "string", "empty"]
)
def test_non_objects_and_empty_objects_fail(instance):
    for name in (CHAT, RESP, EVENT, ERR):
        with pytest.raises(ValidationError):
            validate(name, instance)


# --------------------------------------------------------------------------
# Strictness that fake upstreams/providers must respect: things real
# OpenAI-compatible servers (vLLM, Ollama, LiteLLM, older OpenAI) sometimes
# send, but which the published schemas reject.
# --------------------------------------------------------------------------

KNOWN_DEVIATIONS = [
    (CHAT, CHAT_COMPLETION, ["system_fingerprint"], None),
    (CHAT, CHAT_COMPLETION, ["usage"], None),
    (CHAT, CHAT_COMPLETION, ["choices", 0, "logprobs"], DELETE),
    (CHAT, CHAT_COMPLETION, ["choices", 0, "message", "refusal"], DELETE),
    (CHAT, CHAT_COMPLETION, ["choices", 0, "message", "tool_calls"], None),
    (CHAT, CHAT_COMPLETION, ["choices", 0, "finish_reason"], None),
    (CHUNK, CHAT_CHUNK_FIRST, ["choices", 0, "finish_reason"], DELETE),
    (CHUNK, CHAT_CHUNK_FIRST, ["system_fingerprint"], None),
    (COMPL, COMPLETION, ["choices", 0, "logprobs"], DELETE),
    (EMBED, EMBEDDINGS, ["data", 0, "embedding"], "AAAAAA=="),  # base64
    (MODELS_, MODELS, ["data", 0, "created"], DELETE),
    (ERR, ERROR, ["error", "param"], DELETE),
    (ERR, ERROR, ["error", "code"], 401),
    (RESP, RESPONSE, ["usage", "input_tokens_details", "cache_write_tokens"], DELETE),
    (RESP, RESPONSE, ["output", 0, "content", 0, "logprobs"], DELETE),
    (RESP, RESPONSE, ["user"], None),
    (RESP, RESPONSE_IN_PROGRESS, ["usage"], None),
    (EVENT, EVENT_TEXT_DELTA, ["logprobs"], DELETE),
]


@pytest.mark.parametrize(
    ("schema_name", "base", "path", "value"),
    KNOWN_DEVIATIONS,
    ids=[f"{c[0]}-{'.'.join(map(str, c[2]))}" for c in KNOWN_DEVIATIONS],
)
def test_schemas_are_strict_about_known_real_world_deviations(schema_name, base, path, value):
    with pytest.raises(ValidationError):
        validate(schema_name, _mutate(base, path, value))


# --------------------------------------------------------------------------
# The fixture itself
# --------------------------------------------------------------------------

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "Model",
    "Response",
    "ResponseStreamEvent",
    "ErrorResponse",
    "Error",
]


def test_fixture_contains_roots_and_is_closed_under_refs():
    names = set(schema_names())
    assert set(ROOTS) <= names
    text = SCHEMA_FILE.read_text(encoding="utf-8")
    prefix = '"$ref":"#/components/schemas/'
    refs = {chunk.split('"', 1)[0] for chunk in text.split(prefix)[1:]}
    assert refs and refs <= names
    # every event listed by ResponseStreamEvent is present
    doc = json.loads(text)["components"]["schemas"]
    events = [b["$ref"].rsplit("/", 1)[1] for b in doc["ResponseStreamEvent"]["anyOf"]]
    assert {"ResponseTextDeltaEvent", "ResponseCompletedEvent"} <= set(events) <= names


def test_fixture_is_plain_json_schema_2020_12():
    doc = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))["components"]["schemas"]
    text = json.dumps(doc)
    # OpenAPI-isms normalised away by extract.py
    for keyword in ('"nullable"', '"$recursiveRef"', '"$recursiveAnchor"', '"oneOf"'):
        assert keyword not in text
    for name in ROOTS:
        Draft202012Validator.check_schema(doc[name])


def test_unknown_schema_name():
    with pytest.raises(KeyError):
        validate("NoSuchSchema", {})


def test_validators_are_cached() -> None:
    """Built once per schema (building one is the slow part), then reused: no timing asserted."""
    assert validator("CreateChatCompletionResponse") is validator("CreateChatCompletionResponse")
    assert validator("ResponseStreamEvent") is validator("ResponseStreamEvent")
    validate("CreateChatCompletionResponse", CHAT_COMPLETION)
    validate("ResponseStreamEvent", EVENT_COMPLETED)

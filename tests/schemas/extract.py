#!/usr/bin/env python3
"""Regenerate ``openai_schemas.json`` from OpenAI's OpenAPI description.

This script is run by hand and is *not* used by the test-suite.  The tests
only read the committed ``openai_schemas.json`` (see ``__init__.py``), so the
project does not depend on ``../shared`` or on PyYAML at test time.

Usage (from the repository root)::

    .venv/bin/pip install pyyaml          # only needed to run this script
    .venv/bin/python tests/schemas/extract.py [path/to/openapi.yaml]

The default input is ``../shared/openai/openapi.yaml`` relative to the
repository root (OpenAI's OpenAPI 3.1 description, MIT licence; a copy of the
licence is in ``tests/schemas/LICENSE``).

What it does:

1. Loads the YAML and takes the component schemas listed in ``ROOTS`` plus
   the transitive closure of everything they ``$ref``.
2. Normalises the few OpenAPI-isms that a JSON Schema Draft 2020-12 validator
   would otherwise get wrong (see ``normalise``):

   * ``nullable: true`` (OpenAPI 3.0, still present in a handful of places)
     is turned into real 2020-12: ``"null"`` is added to ``type`` (and
     ``None`` to ``enum``), or a bare ``$ref`` is wrapped as
     ``anyOf: [{$ref}, {type: null}]``.  Otherwise jsonschema would reject
     ``null`` where OpenAI sends it (e.g. ``finish_reason`` in stream chunks).
   * ``$recursiveRef: "#"`` / ``$recursiveAnchor`` (Draft 2019-09; unknown,
     hence silently ignored, in 2020-12) become a plain ``$ref`` to the
     enclosing component schema.
   * ``oneOf`` becomes ``anyOf``.  OpenAI uses ``oneOf`` (+ ``discriminator``)
     for tagged unions, but not every union is strictly disjoint (e.g. an
     ``InputItem`` message with list content matches both ``EasyInputMessage``
     and ``InputMessage``), and "exactly one" would then reject valid data.
     The branches are still checked, only the exclusivity is dropped.

   ``discriminator``, ``example``, ``x-*`` and ``format`` are annotations
   for a 2020-12 validator and are left as they are.
3. Checks every extracted schema against the 2020-12 meta-schema (if
   ``jsonschema`` is importable) and writes
   ``{"components": {"schemas": {...}}}`` with sorted keys and compact
   separators next to this script, ``$ref``s kept as
   ``#/components/schemas/<Name>``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "openai" / "openapi.yaml"
OUTPUT = HERE / "openai_schemas.json"

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

REF_PREFIX = "#/components/schemas/"

# Keywords whose value is a schema / a list of schemas / a map of schemas.
# Used to walk only schema positions (not e.g. a property *named* "nullable").
SCHEMA_ONE = {
    "items",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "additionalItems",
}
SCHEMA_LIST = {"anyOf", "oneOf", "allOf", "prefixItems"}
SCHEMA_MAP = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}


def load_yaml(path: Path) -> dict:
    import yaml  # only needed here, not at test time

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open("rb") as fh:
        return yaml.load(fh, Loader=loader)


def iter_refs(node):
    """Yield every ``$ref`` string anywhere below ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from iter_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_refs(item)


def closure(schemas: dict, roots: list[str]) -> list[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        if name not in schemas:
            raise KeyError(f"schema {name!r} not found in components/schemas")
        seen.add(name)
        for ref in iter_refs(schemas[name]):
            if not ref.startswith(REF_PREFIX):
                raise ValueError(f"{name}: unsupported $ref {ref!r}")
            stack.append(ref[len(REF_PREFIX) :])
    return sorted(seen)


def normalise(schema, component: str, stats: dict):
    """Return a Draft 2020-12 friendly copy of ``schema`` (see module doc)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in SCHEMA_ONE:
            out[key] = normalise(value, component, stats)
        elif key in SCHEMA_LIST:
            out[key] = [normalise(v, component, stats) for v in value]
        elif key in SCHEMA_MAP:
            out[key] = {k: normalise(v, component, stats) for k, v in value.items()}
        else:
            out[key] = copy.deepcopy(value)

    if "$recursiveAnchor" in out:
        del out["$recursiveAnchor"]
        stats["recursiveAnchor"] += 1
    if "$recursiveRef" in out:
        if out.pop("$recursiveRef") != "#":
            raise ValueError(f"{component}: unsupported $recursiveRef")
        out["$ref"] = REF_PREFIX + component
        stats["recursiveRef"] += 1

    if "oneOf" in out:
        if "anyOf" in out:
            # Both present: keep both semantics by nesting.
            out.setdefault("allOf", []).append({"anyOf": out.pop("oneOf")})
        else:
            out["anyOf"] = out.pop("oneOf")
        stats["oneOf"] += 1

    if out.pop("nullable", False) is True:
        stats["nullable"] += 1
        typ = out.get("type")
        if typ is not None:
            types = typ if isinstance(typ, list) else [typ]
            if "null" not in types:
                out["type"] = types + ["null"]
            if "enum" in out and None not in out["enum"]:
                out["enum"] = out["enum"] + [None]
        else:
            # e.g. {"$ref": ..., "nullable": true}: wrap the constraints.
            keep = {
                k: out.pop(k)
                for k in list(out)
                if k in ("description", "title", "default", "deprecated", "example")
                or k.startswith("x-")
            }
            out = {**keep, "anyOf": [out, {"type": "null"}]}
    return out


def check_schemas(schemas: dict) -> None:
    try:
        from jsonschema import Draft202012Validator
    except ImportError:  # pragma: no cover - optional sanity check
        print("jsonschema not importable: skipping meta-schema check", file=sys.stderr)
        return
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source",
        nargs="?",
        type=Path,
        default=DEFAULT_SOURCE,
        help=f"OpenAPI YAML (default: {DEFAULT_SOURCE})",
    )
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    spec = load_yaml(args.source)
    all_schemas = spec["components"]["schemas"]
    names = closure(all_schemas, ROOTS)

    stats = {"nullable": 0, "recursiveRef": 0, "recursiveAnchor": 0, "oneOf": 0}
    schemas = {name: normalise(all_schemas[name], name, stats) for name in names}
    for name in names:  # normalisation must not introduce new references
        for ref in iter_refs(schemas[name]):
            assert ref[len(REF_PREFIX) :] in schemas, (name, ref)
    check_schemas(schemas)

    doc = {"components": {"schemas": schemas}}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    args.output.write_text(text + "\n", encoding="utf-8")

    info = spec.get("info", {})
    print(
        f"source: {args.source} (OpenAPI {spec.get('openapi')}, API version {info.get('version')})"
    )
    print(f"wrote {args.output}: {len(names)} schemas, {len(text.encode()) + 1} bytes")
    print("normalised: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""JSON Schema (what OpenAI clients send) as Gemini's ``Schema``, an OpenAPI 3.0 subset.

Used for ``responseSchema`` and function ``parameters`` when a deployment's ``schemas`` setting
is ``"openapi"`` (the default: every Gemini model takes it). With ``"json_schema"`` the client's
schema goes as it is, in ``responseJsonSchema`` / ``parametersJsonSchema``, and nothing here runs.

What Gemini's Schema cannot say is dropped (``additionalProperties``, ``$schema``, ``not``...);
``$ref`` to ``$defs``/``definitions`` is inlined; ``["string", "null"]`` becomes a nullable
string; ``const`` a one-value enum. A recursive ``$ref`` cannot be inlined: a 400 that points to
the ``json_schema`` setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aioproxy import BadRequest

__all__ = ["GEMINI_TYPES", "MAX_DEPTH", "MAX_NODES", "to_gemini_schema"]

GEMINI_TYPES = frozenset({"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"})
MAX_NODES = 10_000  # schemas after inlining $refs: a few $refs to $refs must not blow up
MAX_DEPTH = 64  # schemas within schemas: far beyond a real one, well within Python's stack

# Keywords Gemini's Schema has under the same name and meaning, copied as they are.
_COPIED = (
    "format",
    "title",
    "description",
    "nullable",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "minProperties",
    "maxProperties",
    "default",
    "example",
    "propertyOrdering",
)
_NUMBERS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")


class _Converter:
    def __init__(self, root: Mapping[str, Any], param: str) -> None:
        self.defs: dict[str, Any] = {}
        for key in ("$defs", "definitions"):
            table = root.get(key)
            if isinstance(table, Mapping):
                self.defs.update({f"#/{key}/{name}": value for name, value in table.items()})
        self.param = param
        self.nodes = 0

    def refuse(self, why: str) -> BadRequest:
        return BadRequest(f"'{self.param}' cannot be sent to Gemini: {why}", param=self.param)

    def convert(self, schema: Any, refs: tuple[str, ...] = (), depth: int = 0) -> dict[str, Any]:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.refuse(f"the schema has over {MAX_NODES} parts once its $refs are inlined")
        if depth > MAX_DEPTH:
            raise self.refuse(f"schemas are nested over {MAX_DEPTH} deep")
        depth += 1
        if schema is True or schema == {}:
            return {}  # anything goes: Gemini's empty Schema says the same
        if not isinstance(schema, Mapping):
            raise self.refuse("a schema must be a JSON object")
        ref = schema.get("$ref")
        if ref is not None:
            if ref in refs:
                raise self.refuse(
                    f"'{ref}' refers to itself, which Gemini's Schema cannot express; set the "
                    'deployment\'s schemas = "json_schema" to send it as JSON Schema'
                )
            target = self.defs.get(ref) if isinstance(ref, str) else None
            if target is None:
                raise self.refuse(f"'$ref' {ref!r} is not one of the schema's $defs")
            return self.convert(target, (*refs, ref), depth)
        out: dict[str, Any] = {}
        for key in _COPIED:
            if key in schema:
                out[key] = schema[key]
        for key in _NUMBERS:  # Gemini's int64s: numbers or decimal strings; others refused
            if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool)):
                del out[key]
        self._type(schema, out, refs, depth)
        if "const" in schema:
            out["enum"] = [schema["const"]]
        elif isinstance(schema.get("enum"), list):
            out["enum"] = schema["enum"]
        if "enum" in out:  # Gemini's enums are of strings
            if all(isinstance(v, str) for v in out["enum"]):
                out.setdefault("type", "STRING")
            else:
                del out["enum"]
        properties = schema.get("properties")
        if isinstance(properties, Mapping):
            out["properties"] = {
                str(name): self.convert(value, refs, depth) for name, value in properties.items()
            }
            required = schema.get("required")
            if isinstance(required, list):
                known = out["properties"]
                out["required"] = [n for n in required if isinstance(n, str) and n in known]
        items = schema.get("items")
        if isinstance(items, list):  # the old tuple form: Gemini has one items schema
            items = items[0] if items else None
        if items is not None and items is not False:
            out["items"] = self.convert(items, refs, depth)
        variants = schema.get("anyOf", schema.get("oneOf"))
        if isinstance(variants, list) and variants:
            out["anyOf"] = [self.convert(v, refs, depth) for v in variants]
        every = schema.get("allOf")
        if isinstance(every, list) and every:
            if len(every) > 1:
                raise self.refuse("'allOf' of several schemas has no Gemini equivalent")
            merged = self.convert(every[0], refs, depth)
            out = {**merged, **out}
        return out

    def _type(
        self, schema: Mapping[str, Any], out: dict[str, Any], refs: tuple[str, ...], depth: int
    ) -> None:
        kind = schema.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        names = [str(k).upper() for k in kinds if isinstance(k, str)]
        if "NULL" in names and len(names) > 1:
            out["nullable"] = True
            names = [n for n in names if n != "NULL"]
        names = [n for n in names if n in GEMINI_TYPES]
        if len(names) == 1:
            out["type"] = names[0]
        elif len(names) > 1:  # ["string", "integer"]: one of them
            base = {k: v for k, v in schema.items() if k != "type"}
            out["anyOf"] = [self.convert({**base, "type": n.lower()}, refs, depth) for n in names]


def to_gemini_schema(schema: Any, param: str) -> dict[str, Any]:
    """``schema`` (decoded JSON Schema) as Gemini's Schema; a 400 naming ``param`` if it cannot
    be sent."""
    if not isinstance(schema, Mapping):
        raise BadRequest(f"'{param}' must be a JSON Schema object", param=param)
    return _Converter(schema, param).convert(schema)

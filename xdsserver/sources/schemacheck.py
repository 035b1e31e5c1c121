"""A fast "certainly valid" for the object schemas; jsonschema stays the judge.

Validating 10,000 pods with jsonschema took ~2.4 s of a 100-node cold build (~220 µs a pod: the
library's per-keyword dispatch, not our schema's size). :func:`compile_schema` turns the keywords
our schemas use into nested closures that answer only *certainly valid* (True) or *don't know*
(False). On False, :func:`..objects.validate_object` runs jsonschema, which finds and words the
errors, so this can make validation faster and never more lenient: every keyword here is checked
exactly as jsonschema 4 (draft 2020-12) checks it, or more strictly, and a keyword it does not
know makes its subschema answer *don't know*. ``tests/test_schemacheck.py`` holds it to that
against jsonschema on fuzzed objects.
"""

from __future__ import annotations

import re
from typing import Any, Callable

Pred = Callable[[Any], bool]

# keywords that only annotate: no effect on validity
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated",
                          "readOnly", "writeOnly"})


def _never(_x: Any) -> bool:
    return False


def _always(_x: Any) -> bool:
    return True


def _is_int(x: Any) -> bool:  # jsonschema: int but not bool, or a float with an integral value
    return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, float) and x.is_integer())


_TYPES: dict[str, Pred] = {
    "string": lambda x: isinstance(x, str),
    "integer": _is_int,
    # jsonschema's "number" is any numbers.Number but bool; int and float only is stricter
    "number": lambda x: type(x) in (int, float),
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "boolean": lambda x: isinstance(x, bool),
    "null": lambda x: x is None,
}
_STRICTER_TYPES = frozenset({"number"})


def _number_or_not(x: Any) -> int:
    """1: a number the bounds apply to (int or float), 0: not a number (the bounds pass),
    -1: some other numeric type (don't know)."""
    t = type(x)
    if t is int or t is float:
        return 1
    if isinstance(x, (str, dict, list, bool)) or x is None:
        return 0
    return -1


def compile_schema(schema: Any, format_checker: Any = None) -> tuple[Pred, bool]:
    """(predicate, exact): the predicate never says True for an instance jsonschema rejects;
    ``exact`` means it also never says False for one jsonschema accepts."""
    if schema is True:
        return _always, True
    if schema is False:
        return _never, True
    if not isinstance(schema, dict):
        return _never, False
    checks: list[Pred] = []
    exact = True

    def add(pred: Pred, is_exact: bool = True) -> None:
        nonlocal exact
        checks.append(pred)
        exact = exact and is_exact

    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        built = _keyword(key, value, schema, format_checker)
        if built is None:  # not a keyword this module knows: never certain
            return _never, False
        if built is not _SKIP:
            add(*built)
    if not checks:
        return _always, exact
    if len(checks) == 1:
        return checks[0], exact
    return _all_of(tuple(checks)), exact


def _all_of(preds: tuple[Pred, ...]) -> Pred:
    def all_of(x: Any) -> bool:  # a loop: ~2x cheaper per call than all() over a generator
        for p in preds:
            if not p(x):
                return False
        return True
    return all_of


_SKIP: Any = object()


def _keyword(key: str, value: Any, schema: dict[str, Any], fc: Any) -> tuple[Pred, bool] | Any | None:
    if key == "type":
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(n in _TYPES for n in names):
            return None
        preds = tuple(_TYPES[n] for n in names)
        is_exact = not any(n in _STRICTER_TYPES for n in names)
        if len(preds) == 1:
            return preds[0], is_exact
        return (lambda x: any(p(x) for p in preds)), is_exact
    if key == "properties":
        if not isinstance(value, dict):
            return None
        subs = {k: compile_schema(v, fc) for k, v in value.items()}
        items = tuple((k, p) for k, (p, _) in subs.items())
        is_exact = all(e for _, e in subs.values())

        def properties(x: Any) -> bool:
            if not isinstance(x, dict):
                return True
            for k, p in items:
                if k in x and not p(x[k]):
                    return False
            return True
        return properties, is_exact
    if key == "additionalProperties":
        if "patternProperties" in schema:
            return None
        known = frozenset(schema.get("properties") or ())
        sub, is_exact = compile_schema(value, fc)

        def additional(x: Any) -> bool:
            if not isinstance(x, dict):
                return True
            for k, v in x.items():
                if k not in known and not sub(v):
                    return False
            return True
        return additional, is_exact
    if key == "required":
        if not isinstance(value, list):
            return None
        req = tuple(value)
        return (lambda x: not isinstance(x, dict) or all(k in x for k in req)), True
    if key == "items":
        if "prefixItems" in schema or not isinstance(value, (dict, bool)):
            return None
        sub, is_exact = compile_schema(value, fc)
        def items(x: Any) -> bool:
            if isinstance(x, list):
                for v in x:
                    if not sub(v):
                        return False
            return True
        return items, is_exact
    if key in ("minItems", "maxItems", "minLength", "maxLength"):
        if not _is_int(value) or isinstance(value, float):
            return None
        n = value
        kind = list if key.endswith("Items") else str
        if key.startswith("min"):
            return (lambda x: not isinstance(x, kind) or len(x) >= n), True
        return (lambda x: not isinstance(x, kind) or len(x) <= n), True
    if key == "pattern":
        try:
            rx = re.compile(value)
        except (re.error, TypeError):
            return None
        return (lambda x: not isinstance(x, str) or rx.search(x) is not None), True
    if key in ("enum", "const"):
        members = value if key == "enum" else [value]
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            return None  # jsonschema's equality for other values (bool vs int, 1 vs 1.0): don't guess
        allowed = frozenset(members)
        return (lambda x: isinstance(x, str) and x in allowed), True
    if key in ("minimum", "maximum"):
        if type(value) not in (int, float):
            return None
        bound = value
        if key == "minimum":
            return (lambda x: (k := _number_or_not(x)) == 0 or (k == 1 and not x < bound)), True  # as jsonschema: NaN passes
        return (lambda x: (k := _number_or_not(x)) == 0 or (k == 1 and not x > bound)), True
    if key == "format":
        if fc is None:
            return _SKIP  # jsonschema without a format checker does not assert formats
        name = value
        return (lambda x: fc.conforms(x, name)), True
    if key in ("anyOf", "allOf", "oneOf"):
        if not isinstance(value, list) or not value:
            return None
        subs = [compile_schema(v, fc) for v in value]
        preds = tuple(p for p, _ in subs)
        all_exact = all(e for _, e in subs)
        if key == "anyOf":  # stricter branches make a stricter any
            return (lambda x: any(p(x) for p in preds)), all_exact
        if key == "allOf":
            return _all_of(preds), all_exact
        if not all_exact:  # "exactly one" needs exact branches
            return None
        return (lambda x: sum(1 for p in preds if p(x)) == 1), True
    if key == "not":
        sub, is_exact = compile_schema(value, fc)
        return ((lambda x: not sub(x)), True) if is_exact else None
    if key == "if":
        cond, cond_exact = compile_schema(value, fc)
        if not cond_exact:  # a stricter "if" would skip a "then" that applies
            return None
        then, then_exact = compile_schema(schema.get("then", True), fc)
        other, other_exact = compile_schema(schema.get("else", True), fc)
        return (lambda x: then(x) if cond(x) else other(x)), then_exact and other_exact
    if key in ("then", "else"):
        return _SKIP  # evaluated with "if" (alone, jsonschema ignores them too)
    return None

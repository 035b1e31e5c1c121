"""The compiled schema check (`xdsserver/sources/schemacheck.py`) agrees with jsonschema.

It may only say "certainly valid" where jsonschema finds no error; for our schemas (every keyword
compiled exactly) it must also say so wherever jsonschema does, or the fast path would not serve
valid input. Checked on the repository's manifests and on hypothesis-mutated copies of them
(fields deleted, retyped, set to odd values), per keyword, and through `validate_object`.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.fuzz import ODD_VALUES, _paths, _set  # noqa: E402

from xdsserver.sources import SourceObject
from xdsserver.sources.manifests import read_objects
from xdsserver.sources.objects import KINDS, _validator, validate_object
from xdsserver.sources.schemacheck import compile_schema

REPO = Path(__file__).resolve().parent.parent
FC = jsonschema.Draft202012Validator.FORMAT_CHECKER

EXTRA = [
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "web-abc", "namespace": "app", "labels": {"kubernetes.io/service-name": "web"}},
     "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
     "endpoints": [{"addresses": ["10.1.0.7"], "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": "n1", "targetRef": {"kind": "Pod", "namespace": "app", "name": "web-1"}}]},
    {"apiVersion": "xdsserver.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
     "spec": {"trustDomain": "example.org", "outboundTrafficPolicy": "REGISTRY_ONLY", "hboneIdleTimeout": "5s",
              "enrollment": {"namespaceLabel": {"key": "mesh", "value": "on"}}}},
]


def _corpus() -> list[dict[str, Any]]:
    objs = [so.obj for d in sorted((REPO / "golden").glob("*/manifests")) for so in read_objects(d)]
    objs += [so.obj for so in read_objects(REPO / "bench" / "manifests")]
    return [o for o in objs + EXTRA if o.get("kind") in KINDS]


CORPUS = _corpus()


def _jsonschema_valid(obj: Any) -> bool:
    kind = obj.get("kind") if isinstance(obj, dict) else None
    return not any(True for _ in _validator(kind).iter_errors(obj))


def _fast(kind: str):
    v = _validator(kind)
    return compile_schema(v.schema, v.format_checker)


def test_every_kind_compiles_exactly_and_the_corpus_is_certainly_valid():
    assert {o["kind"] for o in CORPUS} == set(KINDS), "the corpus should hold every kind"
    for kind in KINDS:
        _, exact = _fast(kind)
        assert exact, f"{kind}: a keyword of its schema is not compiled exactly (every object would take jsonschema)"
    for obj in CORPUS:
        assert _jsonschema_valid(obj), obj
        assert _fast(obj["kind"])[0](obj), f"{obj['kind']} {obj['metadata']}: valid but not certainly valid"


@st.composite
def _mutated(draw) -> dict[str, Any]:
    obj = copy.deepcopy(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(obj)[1:] or [()]))
        op = draw(st.sampled_from(["delete", "replace", "replace", "unknown"]))
        if path[:1] == ("kind",):
            continue  # the kind picks the schema
        obj = _set(obj, path, op, draw(ODD_VALUES))
    return obj


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(_mutated())
def test_compiled_check_agrees_with_jsonschema_on_mutated_objects(obj):
    fast, exact = _fast(obj["kind"])
    assert exact
    assert fast(obj) == _jsonschema_valid(obj)


@pytest.mark.parametrize(
    ("schema", "instance"),
    [
        ({"type": "integer"}, 1), ({"type": "integer"}, 1.0), ({"type": "integer"}, 1.5), ({"type": "integer"}, True),
        ({"type": "integer"}, "1"), ({"type": ["object", "null"]}, None), ({"type": ["object", "null"]}, []),
        ({"minimum": 1, "maximum": 3}, 0), ({"minimum": 1, "maximum": 3}, 2.5), ({"minimum": 1}, True),
        ({"minimum": 1}, "x"), ({"minimum": 1}, float("nan")),
        ({"enum": ["A", "B"]}, "A"), ({"enum": ["A", "B"]}, "C"), ({"const": "Pod"}, "Pod"), ({"const": "Pod"}, None),
        ({"pattern": "^a+$"}, "aa"), ({"pattern": "^a+$"}, "ab"), ({"pattern": "b"}, "abc"), ({"pattern": "^a"}, 3),
        ({"maxLength": 2}, "abc"), ({"maxLength": 2}, "ÿÿ"), ({"minItems": 1}, []), ({"minItems": 1}, {}),
        ({"required": ["a"]}, {}), ({"required": ["a"]}, "not an object"),
        ({"properties": {"a": {"type": "string"}}, "additionalProperties": False}, {"a": "x"}),
        ({"properties": {"a": {"type": "string"}}, "additionalProperties": False}, {"a": "x", "b": 1}),
        ({"additionalProperties": {"type": "string"}}, {"k": 1}), ({"items": {"type": "string"}}, ["a", 1]),
        ({"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}, "10.0.0.1"),
        ({"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}, "fe80::1%eth0"),
        ({"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}, "10.0.0.300"),
        ({"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}, 5),
        ({"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}, "abcd"),
        ({"oneOf": [{"type": "integer"}, {"minimum": 0}]}, 5),  # both branches: not exactly one
        ({"if": {"properties": {"t": {"enum": ["IP"]}}}, "then": {"properties": {"a": {"format": "ipv4"}}}}, {"t": "IP", "a": "x"}),
        ({"if": {"properties": {"t": {"enum": ["IP"]}}}, "then": {"properties": {"a": {"format": "ipv4"}}}}, {"t": "DNS", "a": "x"}),
        ({"not": {"type": "string"}}, 3), ({"not": {"type": "string"}}, "3"),
        (True, 1), (False, 1), ({"title": "only an annotation"}, 1),
    ],
)
def test_each_keyword_matches_jsonschema(schema, instance):
    fast, exact = compile_schema(schema, FC)
    assert exact
    expected = jsonschema.Draft202012Validator(schema, format_checker=FC).is_valid(instance)
    assert fast(instance) is expected


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#/$defs/x", "$defs": {"x": {"type": "string"}}},  # not compiled: never certain
        {"patternProperties": {"^a": {"type": "string"}}},
        {"enum": [1, True]},  # jsonschema's equality of numbers and bools: not guessed
        {"oneOf": [{"type": "number"}, {"type": "string"}]},  # "number" is compiled more strictly
        {"if": {"type": "number"}, "then": {"minimum": 3}},
    ],
)
def test_what_is_not_compiled_exactly_is_never_certainly_valid_or_is_marked_inexact(schema):
    fast, exact = compile_schema(schema, FC)
    assert not exact
    for instance in (1, 1.0, True, "a", {"a": "b"}, [], None, 3, 5):
        if fast(instance):
            assert jsonschema.Draft202012Validator(schema, format_checker=FC).is_valid(instance)


def test_validate_object_still_names_the_field_when_the_fast_path_declines():
    pod = copy.deepcopy(next(o for o in CORPUS if o["kind"] == "Pod"))
    assert validate_object(SourceObject("apps.yaml", pod)) == []
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 70000}]
    (err,) = validate_object(SourceObject("apps.yaml", pod))
    assert err.origin == "apps.yaml" and err.field == "spec.containers[0].ports[0].containerPort"
    assert "70000" in err.message

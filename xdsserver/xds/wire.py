"""Hand-encoded discovery responses built from pre-encoded resource fields.

Each resource's wire form (its `Any`, or its delta `Resource`) is encoded once and shared by every
stream that sends it; a response is then one `bytes.join`, instead of copying every body into a
protobuf message per stream and serializing it again. Field numbers are those of
envoy.service.discovery.v3 (checked against the generated messages in the tests).
"""

from __future__ import annotations

from collections.abc import Iterable

# DiscoveryResponse
_SOTW_VERSION_INFO, _SOTW_RESOURCES, _SOTW_TYPE_URL, _SOTW_NONCE = 1, 2, 4, 5
# DeltaDiscoveryResponse
_DELTA_SYSTEM_VERSION, _DELTA_RESOURCES, _DELTA_TYPE_URL, _DELTA_NONCE, _DELTA_REMOVED = 1, 2, 4, 5, 6
# envoy.service.discovery.v3.Resource
_RES_VERSION, _RES_RESOURCE, _RES_NAME = 1, 2, 3
# google.protobuf.Any
_ANY_TYPE_URL, _ANY_VALUE = 1, 2


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def _str(number: int, value: str) -> bytes:
    return field(number, value.encode()) if value else b""


def any_bytes(type_url: str, body: bytes) -> bytes:
    """Serialized google.protobuf.Any(type_url, value=body)."""
    return _str(_ANY_TYPE_URL, type_url) + (field(_ANY_VALUE, body) if body else b"")


def sotw_resource_field(type_url: str, body: bytes) -> bytes:
    """One `resources` entry of a DiscoveryResponse."""
    return field(_SOTW_RESOURCES, any_bytes(type_url, body))


def delta_resource_field(type_url: str, name: str, version: str, body: bytes) -> bytes:
    """One `resources` entry (a discovery.v3.Resource) of a DeltaDiscoveryResponse."""
    inner = _str(_RES_VERSION, version) + field(_RES_RESOURCE, any_bytes(type_url, body)) + _str(_RES_NAME, name)
    return field(_DELTA_RESOURCES, inner)


def encode_sotw(type_url: str, version_info: str, nonce: str, resource_fields: Iterable[bytes]) -> bytes:
    return b"".join(
        (_str(_SOTW_VERSION_INFO, version_info), *resource_fields, _str(_SOTW_TYPE_URL, type_url), _str(_SOTW_NONCE, nonce))
    )


def encode_delta(
    type_url: str, system_version_info: str, nonce: str, resource_fields: Iterable[bytes], removed: Iterable[str]
) -> bytes:
    return b"".join(
        (
            _str(_DELTA_SYSTEM_VERSION, system_version_info),
            *resource_fields,
            _str(_DELTA_TYPE_URL, type_url),
            _str(_DELTA_NONCE, nonce),
            *(field(_DELTA_REMOVED, n.encode()) for n in removed),
        )
    )

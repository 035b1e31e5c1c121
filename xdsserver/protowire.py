"""Protocol-buffer wire encoding for messages assembled from pre-encoded parts.

Both the translator (a CLA joined from its endpoints' bytes) and the xDS layer (a response
joined from its resources' bytes) build messages this way, to copy bytes once instead of
copying messages and serializing them again.
"""

from __future__ import annotations


def varint(n: int) -> bytes:
    if n < 0x80:  # most tags and lengths: one byte
        return _ONE_BYTE[n]
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))


def field(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(data)) + data

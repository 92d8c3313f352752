"""The codec interface and the self-describing message header.

A codec turns a flat float32 vector into ``bytes`` and back; the lengths of those bytes are what
``bytes_up``/``bytes_down`` report (architecture.md, principle 4). State goes in and comes out
explicitly (error feedback, residual trajectories), so checkpoints are just its serialisation.

Every message starts with a small versioned header, and decoding validates it: corrupt or truncated
bytes raise :class:`CodecError` with a clear message, never a crash or a silently wrong tensor.
"""

from __future__ import annotations

import struct
from typing import Protocol

import numpy as np

MAGIC = b"HFC"
VERSION = 1
# magic, version, codec id, element count, payload length
_HEADER = struct.Struct("<3sBBQQ")
HEADER_SIZE = _HEADER.size


class CodecError(ValueError):
    """A message that cannot be decoded: wrong magic, version, codec, length or payload."""


class Codec(Protocol):
    codec_id: int

    def encode(self, x: np.ndarray, state: dict) -> tuple[bytes, dict]: ...

    def decode(self, data: bytes, state: dict) -> tuple[np.ndarray, dict]: ...


def pack_header(codec_id: int, n: int, payload: bytes | bytearray | memoryview) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, codec_id, n, len(payload)) + bytes(payload)


def unpack_header(data: bytes, codec_id: int) -> tuple[int, memoryview]:
    """Validate a message's header; return (element count, payload view)."""
    if len(data) < HEADER_SIZE:
        raise CodecError(f"message truncated: {len(data)} bytes, header needs {HEADER_SIZE}")
    magic, version, cid, n, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("not an hpcfed message (bad magic)")
    if version != VERSION:
        raise CodecError(f"message version {version}, this hpcfed reads version {VERSION}")
    if cid != codec_id:
        raise CodecError(f"message is codec {cid}, decoder expects codec {codec_id}")
    if len(data) - HEADER_SIZE != length:
        raise CodecError(f"payload is {len(data) - HEADER_SIZE} bytes, header says {length}")
    return n, memoryview(data)[HEADER_SIZE:]

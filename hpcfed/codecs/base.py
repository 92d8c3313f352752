"""The codec interface and the self-describing message header.

A codec turns a flat float32 vector into ``bytes`` and back; the lengths of those bytes are what
``bytes_up``/``bytes_down`` report (architecture.md, principle 4). State goes in and comes out
explicitly (error feedback, residual trajectories), so checkpoints are just its serialisation.

Every message starts with a small versioned header, and decoding validates it: corrupt or truncated
bytes raise :class:`CodecError` with a clear message, never a crash or a silently wrong tensor.
"""

from __future__ import annotations

import struct
import zlib
from typing import Protocol

import numpy as np

MAGIC = b"HFC"
# version 2 added the CRC32, so a flipped bit anywhere (header or payload) is caught before any
# payload parsing: without it a corrupt element count or scale would decode to a wrong tensor
VERSION = 2
# magic, version, codec id, element count, payload length
_FIELDS = struct.Struct("<3sBBQQ")
_CRC = struct.Struct("<I")  # zlib.crc32 of the fields above followed by the payload
_HEADER = struct.Struct("<3sBBQQI")
HEADER_SIZE = _HEADER.size


class CodecError(ValueError):
    """A message that cannot be decoded: wrong magic, version, codec, length or payload."""


class Codec(Protocol):
    codec_id: int

    def encode(self, x: np.ndarray, state: dict) -> tuple[bytes, dict]: ...

    def decode(self, data: bytes, state: dict) -> tuple[np.ndarray, dict]: ...


def pack_header(codec_id: int, n: int, payload: bytes | bytearray | memoryview) -> bytes:
    fields = _FIELDS.pack(MAGIC, VERSION, codec_id, n, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(fields))
    return b"".join((fields, _CRC.pack(crc), payload))


def unpack_header(data: bytes, codec_id: int) -> tuple[int, memoryview]:
    """Validate a message's header; return (element count, payload view)."""
    if len(data) < HEADER_SIZE:
        raise CodecError(f"message truncated: {len(data)} bytes, header needs {HEADER_SIZE}")
    magic, version, cid, n, length, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("not an hpcfed message (bad magic)")
    if version != VERSION:
        raise CodecError(f"message version {version}, this hpcfed reads version {VERSION}")
    if cid != codec_id:
        raise CodecError(f"message is codec {cid}, decoder expects codec {codec_id}")
    if len(data) - HEADER_SIZE != length:
        raise CodecError(f"payload is {len(data) - HEADER_SIZE} bytes, header says {length}")
    payload = memoryview(data)[HEADER_SIZE:]
    if zlib.crc32(payload, zlib.crc32(memoryview(data)[: _FIELDS.size])) != crc:
        raise CodecError("message corrupt: CRC32 mismatch")
    return n, payload


class Reader:
    """Bounds-checked little-endian reads from a payload; every overrun is a :class:`CodecError`."""

    def __init__(self, payload: memoryview | bytes, what: str = "payload"):
        self._buf = memoryview(payload)
        self._pos = 0
        self._what = what

    def take(self, nbytes: int) -> memoryview:
        if nbytes < 0 or self._pos + nbytes > len(self._buf):
            raise CodecError(f"{self._what} truncated: needs {nbytes} more bytes at offset {self._pos}")
        view = self._buf[self._pos : self._pos + nbytes]
        self._pos += nbytes
        return view

    def unpack(self, fmt: str) -> tuple:
        st = struct.Struct("<" + fmt)
        return st.unpack(self.take(st.size))

    def array(self, dtype: str, count: int) -> np.ndarray:
        """A copy of ``count`` items of little-endian ``dtype`` (e.g. "<f4")."""
        dt = np.dtype(dtype)
        return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).astype(dt.newbyteorder("="), copy=True)

    def done(self) -> None:
        if self._pos != len(self._buf):
            raise CodecError(f"{self._what} has {len(self._buf) - self._pos} unexpected trailing bytes")

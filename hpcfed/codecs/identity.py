"""The identity codec: the raw little-endian float32 vector behind the header."""

from __future__ import annotations

import numpy as np

from hpcfed.codecs.base import HEADER_SIZE, CodecError, pack_header, unpack_header


class IdentityCodec:
    codec_id = 0

    @staticmethod
    def encoded_size(n: int) -> int:
        """The length of :meth:`encode`'s message for ``n`` values (fixed: the header, then 4 bytes
        a value); tested equal to ``len(encode(x))``."""
        return HEADER_SIZE + 4 * int(n)

    def encode(self, x: np.ndarray, state: dict) -> tuple[bytes, dict]:
        x = np.ascontiguousarray(x, dtype="<f4").reshape(-1)
        return pack_header(self.codec_id, x.size, x.tobytes()), state

    def decode(self, data: bytes, state: dict) -> tuple[np.ndarray, dict]:
        n, payload = unpack_header(data, self.codec_id)
        if len(payload) != 4 * n:
            raise CodecError(f"identity payload is {len(payload)} bytes for {n} float32 values")
        return np.frombuffer(payload, dtype="<f4").astype(np.float32, copy=True), state

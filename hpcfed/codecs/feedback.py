"""Error feedback: what a codec dropped is added to the next message.

``y = x + residual``; send ``encode(y)``; the new residual is ``y - decode(message)``, computed
from the real bytes, so it is exactly what the receiver is missing. Over any number of steps,
the sum of decoded messages plus the final residual equals the sum of inputs (up to float32
rounding). Seide et al., "1-bit SGD", Interspeech 2014; Lin et al., "Deep Gradient Compression",
ICLR 2018; Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019.

State: ``state["residual"]`` (float32, the sender's; absent means zeros) plus the inner
codec's keys. The decoder is the inner codec's: error feedback changes nothing on the wire.
"""

from __future__ import annotations

import numpy as np


class ErrorFeedback:
    def __init__(self, inner):
        self.inner = inner
        self.codec_id = inner.codec_id

    def encode(self, x: np.ndarray, state: dict) -> tuple[bytes, dict]:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        residual = state.get("residual")
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"residual has shape {residual.shape}, input {x.shape}")
        y = x + residual if residual is not None else x.copy()
        inner_state = {k: v for k, v in state.items() if k != "residual"}
        data, inner_state = self.inner.encode(y, inner_state)
        decoded, _ = self.inner.decode(data, {})
        inner_state["residual"] = y - decoded
        return data, inner_state

    def decode(self, data: bytes, state: dict) -> tuple[np.ndarray, dict]:
        return self.inner.decode(data, state)

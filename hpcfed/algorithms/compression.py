"""The ``[compress]`` table applied to an algorithm's messages, through the codecs.

Uplink: each client encodes its update to bytes, the server side decodes those bytes, and the
decoded update joins the collective (FLSim's quantise-dequantise, with real bytes). With error
feedback the client keeps the residual of what its codec dropped (Seide et al. 2014; Karimireddy et
al. 2019): that is per-client state, so clients then live on a fixed home rank.

Downlink: the server compresses its step ``w_{t+1} - w_t`` (plus its own residual under error
feedback) and applies the decoded step, so the global model is exactly what clients reconstruct
from the bytes (bidirectional compression as in DoubleSqueeze, Tang et al. 2019). This assumes a
client tracks the global model between its rounds, as those methods do; the first round sends the
full model. ``bytes_down`` counts the compressed step per participating client.

Stochastic rounding draws come from (seed, round, client), never from rank-local counters.
"""

from __future__ import annotations

import numpy as np

from hpcfed.codecs import IdentityCodec, make_codec
from hpcfed.config import CompressConfig, UserError


def require_plain_uplink(cfg: CompressConfig, algorithm: str, why: str) -> None:
    """Sub-model algorithms (PriSM, SuperFed) send different slices every round, so neither a
    per-client residual (error feedback) nor a compressed global step (downlink) has a meaning."""
    if cfg.active and (cfg.error_feedback or cfg.direction != "up"):
        raise UserError(f'{algorithm}: [compress] supports direction = "up" without error_feedback ({why})')


class Compression:
    def __init__(self, cfg: CompressConfig, seed: int, num_clients: int):
        self.cfg = cfg
        self.num_clients = num_clients
        on = cfg.active
        self.up_on = on and cfg.direction in ("up", "both")
        self.down_on = on and cfg.direction in ("down", "both")

        def codec(ef: bool):
            return make_codec(cfg.sparsity, cfg.quantization, cfg.bits, ef, seed, rounding=cfg.rounding)

        self.up = codec(cfg.error_feedback) if self.up_on else IdentityCodec()
        self.down = codec(cfg.error_feedback) if self.down_on else IdentityCodec()
        self.identity = IdentityCodec()
        self.client_states: dict[int, dict] = {}  # uplink error-feedback state of this rank's clients

    @property
    def needs_home_rank(self) -> bool:
        return self.up_on and self.cfg.error_feedback

    # -- uplink ----------------------------------------------------------------------------------
    def send_up(self, client_id: int, round_index: int, x: np.ndarray) -> tuple[bytes, np.ndarray]:
        """(the client's bytes, what the server decodes from them)."""
        if self.up_on and not np.isfinite(x).all():
            # a diverged client: the codecs refuse non-finite input, and the engine rejects this
            # update before aggregation anyway (counted in rejected_updates); its error-feedback
            # memory is left as it was rather than poisoned
            data, _ = self.identity.encode(x.astype(np.float32), {})
            return data, x
        if not self.up_on:  # the identity codec: its decoded bytes are x as float32, exactly
            data, _ = self.identity.encode(x, {})
            return data, np.asarray(x, dtype=np.float32)
        state = dict(self.client_states.get(client_id, {}))
        state["step"] = round_index * self.num_clients + client_id
        data, state = self.up.encode(x, state)
        if self.needs_home_rank:
            self.client_states[client_id] = {"residual": state["residual"]}
        decoded, _ = self.up.decode(data, {})
        return data, decoded

    # -- downlink (replicated server state) -----------------------------------------------------
    def compress_step(self, state: dict[str, np.ndarray], step: np.ndarray, round_index: int) -> np.ndarray:
        """The server step the clients can reconstruct; records its encoded length in the state."""
        if not self.down_on:
            return step
        codec_state = {"step": round_index}
        if "down_residual" in state:
            codec_state["residual"] = state["down_residual"]
        data, codec_state = self.down.encode(step.astype(np.float32), codec_state)
        if self.cfg.error_feedback:
            state["down_residual"] = codec_state["residual"]
        state["down_bytes"] = np.array([len(data)], dtype=np.int64)
        decoded, _ = self.down.decode(data, {})
        return decoded.astype(np.float64)

    def down_bytes(self, state: dict[str, np.ndarray], full_model_bytes: int) -> int:
        """Bytes one client receives this round: the compressed step, or the full model."""
        if self.down_on and "down_bytes" in state:
            return int(state["down_bytes"][0])
        return full_model_bytes

    # -- checkpoints ------------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"up_residual.{cid}": s["residual"] for cid, s in self.client_states.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.client_states = {
            int(name.split(".", 1)[1]): {"residual": np.asarray(arr, dtype=np.float32)}
            for name, arr in arrays.items()
            if name.startswith("up_residual.")
        }

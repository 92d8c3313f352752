"""Character (token) models for next-character prediction: ``char_lstm`` and ``char_transformer``.

Both take a batch of token ids ``(N, T)`` (int64, ``input_shape = (T,)``) and give logits over
the ``num_classes`` output tokens, either at every position, ``(N, T, V)`` (``outputs =
"sequence"``, the default: TFF's Shakespeare task, targets ``(N, T)``), or after the last
position only, ``(N, V)`` (``outputs = "last"``: LEAF's Shakespeare task, one next character per
80-character string, and Sent140's one label per tweet). Options come from ``model.options``.

* ``char_lstm``: the Shakespeare model of LEAF (``models/shakespeare/stacked_lstm.py``) and of
  TFF (``tff.simulation.baselines.shakespeare``, after McMahan et al. 2017): an embedding of
  ``embedding = 8`` per token, ``num_layers = 2`` LSTM layers of ``hidden_size = 256`` and a
  linear head over the vocabulary. With TFF's 90 tokens that is 822,570 parameters; with LEAF's
  80 letters, 819,920 (PyTorch's LSTM has two bias vectors per layer where Keras has one: 2,048
  more than the TensorFlow models).
* ``char_transformer``: a small causal (decoder-only) transformer: token and learned position
  embeddings of width ``d_model = 64``, ``num_layers = 2`` pre-norm blocks of ``num_heads = 4``
  causal self-attention heads and a GELU MLP of ``4 * d_model``, a final LayerNorm and a linear
  head. No dropout (deterministic by construction). Positions beyond ``input_shape`` are an error.

``vocab_size`` is the number of input ids (default ``num_classes``: Shakespeare's inputs and
targets share one vocabulary; Sent140's word ids need ``vocab_size = words + 1``, the +1 being
LEAF's unknown-word id). ``state_dict`` keys: ``embedding.weight``, ``lstm.*`` or
``position.weight`` and ``blocks.{i}.*``, then ``head.*``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hpcfed.errors import UserError

OUTPUTS = ("sequence", "last")


def _token_ids(name: str, x: torch.Tensor) -> torch.Tensor:
    """The model's input as it must be: integer token ids. Float inputs mean the model is fed
    something other than a text dataset, e.g. by PriSM, which probes models with float zeros (its
    factorised forms exist for mlp, cnn and resnet only): exit 2 naming the key, not a traceback."""
    if x.is_floating_point():
        raise UserError(
            f"model.name = {name!r} takes integer token ids (a text dataset) but was given {x.dtype} inputs; "
            "an algorithm that builds its own form of the model (prism, superfed) cannot train it"
        )
    return x


def _check(name: str, input_shape, num_classes: int, vocab_size: int | None, outputs: str, **positive):
    if len(tuple(input_shape)) != 1:
        raise UserError(
            f"model.name = {name!r} takes token sequences, input shape (T,); got {tuple(input_shape)} "
            "(a text dataset: leaf with Shakespeare or Sent140, fed_shakespeare, pfl)"
        )
    if outputs not in OUTPUTS:
        raise UserError(f"model.options.outputs = {outputs!r}: expected one of {', '.join(OUTPUTS)}")
    for key, value in {
        **positive,
        "vocab_size": vocab_size if vocab_size is not None else num_classes,
    }.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"model.options.{key} = {value!r}: expected a positive integer")


class CharLSTM(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embedding: int,
        hidden_size: int,
        num_layers: int,
        outputs: str,
    ) -> None:
        super().__init__()
        self.outputs = outputs
        self.embedding = nn.Embedding(vocab_size, embedding)
        self.lstm = nn.LSTM(embedding, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embedding(_token_ids("char_lstm", x)))
        return self.head(h[:, -1] if self.outputs == "last" else h)


def build_char_lstm(
    input_shape,
    num_classes: int,
    embedding: int = 8,
    hidden_size: int = 256,
    num_layers: int = 2,
    vocab_size: int | None = None,
    outputs: Literal["sequence", "last"] = "sequence",
) -> CharLSTM:
    """``model.name = "char_lstm"`` (see the module docstring for the options)."""
    _check(
        "char_lstm", input_shape, num_classes, vocab_size, outputs,
        embedding=embedding, hidden_size=hidden_size, num_layers=num_layers,
    )  # fmt: skip
    return CharLSTM(vocab_size or num_classes, num_classes, embedding, hidden_size, num_layers, outputs)


class CausalBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)); attention is causal."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        # (N, T, D) -> (N, heads, T, D / heads); position i attends to positions <= i only
        q, k, v = (a.view(n, t, self.num_heads, d // self.num_heads).transpose(1, 2) for a in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    def __init__(
        self, vocab_size: int, num_classes: int, length: int, d_model: int, num_heads: int, num_layers: int,
        outputs: str,
    ) -> None:  # fmt: skip
        super().__init__()
        self.outputs = outputs
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(length, d_model)
        self.blocks = nn.ModuleList(CausalBlock(d_model, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        for block in self.blocks:  # GPT-2's scaling of the residual projections by depth
            for layer in (block.proj, block.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * num_layers))
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.position.num_embeddings:
            raise ValueError(
                f"sequence of {t} tokens; the model was built for at most {self.position.num_embeddings}"
            )
        h = self.embedding(_token_ids("char_transformer", x)) + self.position.weight[:t]
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return self.head(h[:, -1] if self.outputs == "last" else h)


def build_char_transformer(
    input_shape,
    num_classes: int,
    d_model: int = 64,
    num_heads: int = 4,
    num_layers: int = 2,
    vocab_size: int | None = None,
    outputs: Literal["sequence", "last"] = "sequence",
) -> CharTransformer:
    """``model.name = "char_transformer"`` (see the module docstring for the options)."""
    _check(
        "char_transformer", input_shape, num_classes, vocab_size, outputs,
        d_model=d_model, num_heads=num_heads, num_layers=num_layers,
    )  # fmt: skip
    if d_model % num_heads:
        raise UserError(f"model.options.d_model = {d_model}: expected a multiple of num_heads = {num_heads}")
    length = int(tuple(input_shape)[0])
    return CharTransformer(
        vocab_size or num_classes, num_classes, length, d_model, num_heads, num_layers, outputs
    )

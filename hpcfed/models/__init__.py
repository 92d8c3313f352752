"""The model families: ``build_model(cfg, input_shape, num_classes)``.

One module per family (``mlp``, ``cnn``, ``resnet``; ``elastic``: SuperFed's supernets and their
subnets). Every model is float32 on the CPU and takes a batch ``(N, *input_shape)``; its
parameters are initialised from torch's global generator, so the engine's ``torch.manual_seed``
before building gives the same model on every rank. The ``state_dict`` keys are what checkpoints
store (interface.md), so layers have plain, stable names. An input shape a family cannot take
is a :class:`~hpcfed.config.UserError`.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcfed.config import ModelConfig, UserError

__all__ = ["build_model"]


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model ``cfg`` names, for inputs of ``input_shape`` (no batch axis) and ``num_classes``."""
    input_shape = tuple(int(d) for d in input_shape)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if cfg.name == "mlp":
        from hpcfed.models.mlp import MLP

        if any(w < 1 for w in cfg.hidden):
            raise UserError(f"model.hidden: widths must be positive integers (got {cfg.hidden})")
        model: nn.Module = MLP(input_shape, cfg.hidden, num_classes)
    elif cfg.name == "cnn":
        from hpcfed.models.cnn import build_cnn

        model = build_cnn(input_shape, num_classes)
    elif cfg.name in ("resnet8", "resnet18"):
        from hpcfed.models.resnet import build_resnet

        model = build_resnet(cfg.name, input_shape, num_classes, cfg.norm)
    elif cfg.name in ("elastic_mlp", "elastic_resnet"):
        from hpcfed.models.elastic import build_elastic

        model = build_elastic(cfg, input_shape, num_classes)  # the supernet, or model.subnet alone
    else:  # unreachable through ModelConfig's Literal, but say so plainly if it ever happens
        raise UserError(f"model.name: unknown model {cfg.name!r}")
    return model.to(device="cpu", dtype=torch.float32)

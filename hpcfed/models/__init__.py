"""The models: ``build_model(cfg, input_shape, num_classes)``, for built-ins and user code alike.

``model.name`` goes through :mod:`hpcfed.registry`: a built-in name is a reference into one module
per family (``mlp``, ``cnn``, ``resnet``; ``elastic``: SuperFed's supernets and their subnets),
anything else is the user's ``"module:build"``. Either is called as
``build(input_shape, num_classes, **options)`` and must return a ``torch.nn.Module``; a built-in
also receives its own ``[model]`` keys (``hidden``, ``norm``, ...) as options.

Every model is float32 and takes a batch ``(N, *input_shape)``; its parameters are initialised
from torch's global generator, which the engine seeds before building, so the model is the same
on every rank. The ``state_dict`` keys are what checkpoints store (interface.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcfed import registry
from hpcfed.config import ModelConfig
from hpcfed.errors import UserError

__all__ = ["build_model", "model_options"]


def model_options(cfg: ModelConfig) -> dict[str, Any]:
    """The keyword options of the builder: a built-in's own keys, then ``model.options``."""
    return registry.call_options("model.name", cfg.name, "model", cfg, cfg.options)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model ``cfg`` names, for inputs of ``input_shape`` (no batch axis) and ``num_classes``."""
    input_shape = tuple(int(d) for d in input_shape)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    build = registry.resolve_callable("model.name", cfg.name)
    options = model_options(cfg)
    try:
        model = build(input_shape, num_classes, **options)
    except TypeError as exc:
        if registry.builtin("model.name", cfg.name) is None and _is_call_mismatch(exc, build):
            raise UserError(
                f"model.name = {cfg.name!r}: cannot be called as build(input_shape, num_classes"
                f"{''.join(f', {k}=...' for k in options)}): {exc}"
            ) from None
        raise
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model.name = {cfg.name!r}: returned {type(model).__name__}; expected a torch.nn.Module"
        )
    return model.to(device="cpu", dtype=torch.float32)


def _is_call_mismatch(exc: TypeError, fn) -> bool:
    """A TypeError from binding the arguments (a wrong signature), not from inside the function."""
    import inspect

    try:
        inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    tb = exc.__traceback__
    return tb is not None and tb.tb_next is None  # raised at the call itself, no frame inside

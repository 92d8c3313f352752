"""A module's float state bound to views of one contiguous vector.

Every floating-point parameter and buffer of the model becomes a view into a single float32
vector, so "load the global model" is one ``copy_`` and "the client's result" is that vector:
no per-tensor Python loops on the round's hot path (FLSim and pfl flatten the same way).
Integer buffers (BatchNorm's ``num_batches_tracked``) stay outside: they are not averaged.
"""

from __future__ import annotations

import numpy as np
import torch


class FlatModel:
    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.offsets: list[int] = []
        owners: list[tuple[torch.nn.Module, str, bool]] = []
        seen: set[int] = set()
        for prefix, mod in module.named_modules():
            for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
                for attr, tensor in table.items():
                    if tensor is None or not tensor.is_floating_point() or id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    self.names.append(f"{prefix}.{attr}" if prefix else attr)
                    self.shapes.append(tensor.shape)
                    owners.append((mod, attr, kind == "param"))
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = list(np.cumsum([0, *sizes]))
        self.size = int(self.offsets[-1])
        first = next(iter(module.parameters()))
        self.vector = torch.empty(self.size, dtype=torch.float32, device=first.device)
        for (mod, attr, is_param), shape, start, size in zip(owners, self.shapes, self.offsets, sizes):
            old = getattr(mod, attr)
            view = self.vector[start : start + size].view(shape)
            view.copy_(old.detach())
            if is_param:
                old.data = view  # the Parameter object (and optimisers' references) stays the same
            else:
                mod._buffers[attr] = view

    def get(self) -> np.ndarray:
        """A host float32 copy of the vector."""
        return self.vector.detach().cpu().numpy().copy()

    def set(self, values: np.ndarray | torch.Tensor) -> None:
        src = torch.as_tensor(values)
        self.vector.copy_(src.to(self.vector.device, dtype=torch.float32))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def slice_of(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

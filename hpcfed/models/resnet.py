"""CIFAR ResNets: ``resnet8`` and ``resnet18`` with a choice of normalisation.

Both are the CIFAR form of He et al. 2016: a 3×3 stride-1 stem and no max-pool, so a 32×32 image
keeps its resolution into the first stage, then global average pooling and one linear layer.

* ``resnet18``: BasicBlock ×[2, 2, 2, 2] at 64-128-256-512 channels, stride 2 at the start of
  stages 2-4: Kuang Liu's widely used pytorch-cifar ``ResNet18`` (11,173,962 parameters with 10
  classes, the same for GroupNorm and BatchNorm, whose affine parameters are one scale and one
  shift per channel).
* ``resnet8``: one BasicBlock per stage, three stages at 16-32-64 channels (78,042 parameters with
  10 classes and a normalisation layer; the small ResNet of the FL literature's CIFAR tests).

Shortcuts are identities, or a strided 1×1 convolution + normalisation where the shape changes
(He et al.'s option B). Convolutions have no bias (a normalisation follows each of them; with
``norm = "none"`` they stay bias-free, so the three variants differ only in their norm layers).

Normalisation (``model.norm``):

* ``"group"`` (default): ``GroupNorm`` with ``min(32, channels // 4)`` groups, i.e. groups of at
  least 4 channels and at most 32 groups (16 ch → 4 groups, 64 → 16, ≥128 → 32). It normalises
  each sample on its own, so it has no running statistics. BatchNorm's running means and variances
  are statistics of each client's own data: on non-IID clients they disagree, and averaging them
  (or averaging weights trained against different statistics) gives a global model whose test-time
  statistics fit no client (Hsieh et al. 2020, "The Non-IID Data Quagmire"). The methods' own
  authors disable BN for that reason, and GroupNorm is the usual replacement.
* ``"batch"``: ``BatchNorm2d``, for comparison. Its ``state_dict`` adds the buffers
  ``running_mean``, ``running_var`` (float) and ``num_batches_tracked`` (int64).
* ``"none"``: ``Identity``.

``state_dict`` keys: ``conv1``/``norm1`` (stem), ``layer{1..4}.{block}.conv1|norm1|conv2|norm2``,
``layer{k}.{block}.shortcut.0`` (conv) / ``.shortcut.1`` (norm) where the shape changes, ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcfed.config import UserError
from hpcfed.models.cnn import as_image

# name -> (blocks per stage, channels per stage)
ARCHITECTURES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "resnet8": ((1, 1, 1), (16, 32, 64)),
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512)),
}


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        groups = max(1, min(32, channels // 4))
        while channels % groups:  # never for the widths above; keeps odd widths valid
            groups -= 1
        return nn.GroupNorm(groups, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise UserError(f"model.norm: unknown normalisation {kind!r}; expected group, batch or none")


class BasicBlock(nn.Module):
    """conv1 (``in → mid``) and conv2 (``mid → channels``); ``mid`` defaults to ``channels``
    (SuperFed's elastic ResNet narrows it: the block's expand ratio, see ``elastic.py``)."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str, mid: int | None = None):
        super().__init__()
        mid = channels if mid is None else mid
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(norm, mid)
        self.conv2 = nn.Conv2d(mid, channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = norm_layer(norm, channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), norm_layer(norm, channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        blocks: tuple[int, ...],
        channels: tuple[int, ...],
        norm: str,
        mids: list[list[int]] | None = None,  # per stage, per block: conv1's output channels
    ) -> None:
        super().__init__()
        self.image_shape = image_shape  # flat inputs (digits) are viewed as this
        self.conv1 = nn.Conv2d(image_shape[0], channels[0], 3, stride=1, padding=1, bias=False)
        self.norm1 = norm_layer(norm, channels[0])
        in_channels = channels[0]
        for stage, (n, width) in enumerate(zip(blocks, channels), start=1):
            stride = 1 if stage == 1 else 2
            layer = []
            for i in range(n):
                mid = None if mids is None else mids[stage - 1][i]
                layer.append(BasicBlock(in_channels, width, stride if i == 0 else 1, norm, mid))
                in_channels = width
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
        self.num_stages = len(blocks)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        x = torch.relu(self.norm1(self.conv1(x)))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        # global average pooling: Kuang Liu's avg_pool2d(4) on 32×32 inputs, for any size
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (C, H, W) a ResNet named ``name`` sees, or a UserError for inputs it cannot take."""
    shape = as_image(input_shape)
    if len(shape) != 3 or shape[0] < 1 or shape[1] < 8 or shape[2] < 8:
        raise UserError(
            f"model.name = {name!r} expects an image input shape (C, H, W) with H, W >= 8 "
            f"(e.g. (3, 32, 32)) or (64,) (8x8 digits); got {input_shape}"
        )
    return shape


def build_resnet(name: str, input_shape: tuple[int, ...], num_classes: int, norm: str) -> ResNet:
    shape = image_shape(name, input_shape)
    blocks, channels = ARCHITECTURES[name]
    return ResNet(shape, num_classes, blocks, channels, norm)


def build_resnet8(input_shape: tuple[int, ...], num_classes: int, norm: str = "group") -> ResNet:
    return build_resnet("resnet8", input_shape, num_classes, norm)


def build_resnet18(input_shape: tuple[int, ...], num_classes: int, norm: str = "group") -> ResNet:
    return build_resnet("resnet18", input_shape, num_classes, norm)

"""Small convolutional nets: two 3×3 convolutions, max-pooling, dropout, two dense layers.

One layout, three sizes, picked by the input's spatial size (any number of channels):

* **28×28** (MNIST, EMNIST): exactly the "standard EMNIST CNN" of the federated-learning
  literature, TensorFlow Federated's ``create_conv_dropout_model`` (used by Reddi et al. 2021,
  "Adaptive Federated Optimization"):
  conv 32 3×3 ReLU → conv 64 3×3 ReLU (both unpadded: 28→26→24) → maxpool 2 (12×12×64) →
  dropout 0.25 → dense 128 ReLU → dropout 0.5 → dense ``num_classes``. With 62 classes it has
  1,206,590 parameters, 1,179,776 of them in the dense-128 layer (``fc1``): freezing that layer,
  as FedPT does, trains ~45× fewer. (TFF initialises with Glorot-normal; we keep PyTorch's
  default initialisation, as for every model here.)
* **8×8** (scikit-learn digits; a flat ``(64,)`` input is viewed as ``(1, 8, 8)``): the same layout
  with 16 and 32 channels, ``padding=1`` so the tiny image is not eaten by unpadded convolutions,
  and a dense layer of 64: 8×8 → pool 4×4×32 = 512 → 64 → classes (38,282 parameters with 10).
* **32×32** (CIFAR-10): conv 32 and conv 64, ``padding=1``, each followed by maxpool 2, so the
  dense-128 layer sees 8×8×64 = 4,096 features rather than 14×14×64 (545,098 parameters with 10
  classes).

No BatchNorm: its running statistics do not average across non-IID clients (see ``resnet``).
``state_dict`` keys: ``conv1.*``, ``conv2.*``, ``fc1.*`` (the dense hidden layer), ``fc2.*``.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcfed.config import UserError

_EXPECTED = "(64,) (8x8 digits, flat), (C, 8, 8), (C, 28, 28) or (C, 32, 32)"


class ConvNet(nn.Module):
    """conv1 → ReLU → [pool] → conv2 → ReLU → pool → dropout → fc1 → ReLU → dropout → fc2."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        channels: tuple[int, int],
        dense: int,
        padding: int,
        pool_after_each: bool,
    ) -> None:
        super().__init__()
        in_channels, size, _ = image_shape
        self.image_shape = image_shape  # flat inputs (digits) are viewed as this
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=padding)
        self.pool1 = nn.MaxPool2d(2) if pool_after_each else nn.Identity()
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size=3, padding=padding)
        self.pool2 = nn.MaxPool2d(2)
        self.dropout1 = nn.Dropout(0.25)
        for _ in range(2):  # each 3×3 convolution shrinks by 2 - 2·padding, each pool halves
            size = size - 2 + 2 * padding
            if pool_after_each:
                size //= 2
        if not pool_after_each:
            size //= 2
        self.fc1 = nn.Linear(channels[1] * size * size, dense)
        self.dropout2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(dense, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = self.dropout1(x).flatten(1)
        x = self.dropout2(torch.relu(self.fc1(x)))
        return self.fc2(x)


def as_image(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The image shape a convolutional model sees: digits' flat ``(64,)`` is ``(1, 8, 8)``."""
    return (1, 8, 8) if tuple(input_shape) == (64,) else tuple(input_shape)


def build_cnn(input_shape: tuple[int, ...], num_classes: int) -> ConvNet:
    shape = as_image(input_shape)
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] not in (8, 28, 32) or shape[0] < 1:
        raise UserError(f"model.name = 'cnn' expects input shape {_EXPECTED}; got {input_shape}")
    size = shape[1]
    if size == 28:
        return ConvNet(shape, num_classes, channels=(32, 64), dense=128, padding=0, pool_after_each=False)
    if size == 8:
        return ConvNet(shape, num_classes, channels=(16, 32), dense=64, padding=1, pool_after_each=False)
    return ConvNet(shape, num_classes, channels=(32, 64), dense=128, padding=1, pool_after_each=True)

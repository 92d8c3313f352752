"""Elastic models for SuperFed (Khare et al., arXiv 2301.10879): one supernet, nested subnets.

Every subnet is a prefix of the supernet in every elastic dimension, so its weights are a fixed
set of positions of the supernet's flat vector and it *is* a plain, smaller model:

* ``elastic_mlp``: the supernet is an MLP with hidden widths ``model.hidden``; a subnet keeps the
  first ``depth`` hidden layers and the first ``widths[i]`` units of layer ``i``; the classifier
  reads the first units of the last kept layer. Spec: ``{"depth": 2, "widths": [64, 32]}``; its
  standalone model is ``MLP(hidden=[64, 32])``.
* ``elastic_resnet``: OFA-style (Cai et al. 2020) on our CIFAR ResNet: stages of ``model.blocks``
  BasicBlocks at ``model.channels``; a subnet keeps the first ``depths[s]`` blocks of stage ``s``
  and the first ``widths[s][j]`` middle channels of block ``j`` (its expand ratio times the
  stage's channels). Stem, stage outputs, shortcuts and classifier are never cut, so the residual
  stream keeps its width. Spec: ``{"depths": [1, 2, 1], "widths": [[4], [8, 16], [64]]}``; its
  standalone model is ``ResNet(..., mids=widths)``.

No BatchNorm (the authors disable it): GroupNorm or none; a subnet's GroupNorm over ``m``
channels uses the first ``m`` affine parameters of the supernet's.

The *choices* (``[superfed] depths`` and ``widths``, width given as ratios) are what random
subnets are drawn from and what "smallest"/"largest" mean; any spec inside the supernet is valid
(export, evaluation, ``model.subnet``). Widths from ratios are ⌈ratio·C⌉, at least 1.

Where we differ from the authors' code (gatech-sysml/superfednas): their supernets are OFA's
(bottleneck ResNets, with BatchNorm modules switched off); ours reuse hpcfed's MLP and
BasicBlock ResNet; the subnet is built as its own small model rather than masked in the supernet,
so parameters, MACs and bytes really shrink.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcfed.config import ModelConfig, SuperFedConfig, UserError
from hpcfed.flat import FlatModel
from hpcfed.models.factorized import kept
from hpcfed.models.mlp import MLP

ELASTIC_MODELS = ("elastic_mlp", "elastic_resnet")
KEYWORDS = ("smallest", "largest")


class ElasticMLP(MLP):
    """The elastic MLP's supernet: an MLP whose classifier reads up to ``max(hidden)`` units, so a
    shallow subnet may keep a wide last layer. Its forward pass is the largest subnet's."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int], num_classes: int) -> None:
        super().__init__(input_shape, hidden, num_classes)
        self.output = nn.Linear(max(hidden), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return F.linear(x, self.output.weight[:, : x.shape[1]], self.output.bias)


def spec_text(spec: dict) -> str:
    """A spec as compact JSON (also the cache key: specs are built in one canonical key order)."""
    return json.dumps(spec, separators=(",", ":"))


def _int(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{what} must be an integer in [{low}, {high}] (got {value!r})")
    return value


def _list(value: Any, length: int, what: str) -> list:
    if not isinstance(value, list) or len(value) != length:
        raise UserError(f"{what} must be a list of {length} (got {value!r})")
    return value


class ElasticSpace:
    """The subnets of one elastic model and the choices they are drawn from."""

    example = ""

    def __init__(self, depths: Sequence[int], ratios: Sequence[float]):
        self.depths, self.ratios = sorted(set(depths)), sorted(set(ratios))

    # -- specs -------------------------------------------------------------------------------------
    def resolve(self, value: Any, key: str) -> dict:
        """``"smallest"`` | ``"largest"`` | a JSON text | a dict → a validated canonical spec."""
        if isinstance(value, str):
            text = value.strip()
            if text == "smallest":
                return self.smallest()
            if text == "largest":
                return self.largest()
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise UserError(
                    f"{key}: expected smallest, largest or a JSON spec such as {self.example} (got {text!r})"
                ) from None
        if not isinstance(value, dict):
            raise UserError(f"{key}: a subnet spec is a table/object such as {self.example} (got {value!r})")
        return self.canonical(value, key)

    def smallest(self) -> dict:
        return self.uniform(self.depths[0], self.ratios[0])

    def largest(self) -> dict:
        return self.uniform(self.depths[-1], self.ratios[-1])

    def ladder(self, n: int) -> list[dict]:
        """``n`` subnets from smallest to largest, stepping depth and width choices together
        (n = 4: smallest, two middle, largest); duplicates dropped."""
        out: list[dict] = []
        for i in range(n):
            f = i / max(n - 1, 1)
            d = self.depths[int(f * (len(self.depths) - 1) + 0.5)]
            r = self.ratios[int(f * (len(self.ratios) - 1) + 0.5)]
            spec = self.uniform(d, r)
            if spec not in out:
                out.append(spec)
        return out

    def choose(self, rng: np.random.Generator, choices: list):
        return choices[int(rng.integers(len(choices)))]

    # -- subclasses --------------------------------------------------------------------------------
    def canonical(self, value: dict, key: str) -> dict:
        raise NotImplementedError

    def uniform(self, depth: int, ratio: float) -> dict:
        raise NotImplementedError

    def sample(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def supernet(self, input_shape, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def build(self, spec: dict, input_shape, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def macs(self, spec: dict, input_shape, num_classes: int) -> int:
        raise NotImplementedError

    def params(self, spec: dict, input_shape, num_classes: int) -> int:
        raise NotImplementedError


class MLPSpace(ElasticSpace):
    example = '{"depth": 2, "widths": [64, 32]}'

    def __init__(self, hidden: Sequence[int], depths: Sequence[int], ratios: Sequence[float]):
        self.hidden = list(hidden)
        super().__init__(depths, ratios)

    def canonical(self, value: dict, key: str) -> dict:
        if set(value) != {"depth", "widths"}:
            raise UserError(f"{key}: an elastic_mlp spec has keys depth and widths, e.g. {self.example}")
        depth = _int(value["depth"], 1, len(self.hidden), f"{key}.depth")
        widths = _list(value["widths"], depth, f"{key}.widths (one width per kept layer)")
        return {
            "depth": depth,
            "widths": [
                _int(w, 1, h, f"{key}.widths[{i}]") for i, (w, h) in enumerate(zip(widths, self.hidden))
            ],
        }

    def uniform(self, depth: int, ratio: float) -> dict:
        return {"depth": depth, "widths": [kept(ratio, h) for h in self.hidden[:depth]]}

    def sample(self, rng: np.random.Generator) -> dict:
        depth = self.choose(rng, self.depths)
        return {
            "depth": depth,
            "widths": [kept(self.choose(rng, self.ratios), h) for h in self.hidden[:depth]],
        }

    def supernet(self, input_shape, num_classes: int) -> nn.Module:
        return ElasticMLP(input_shape, self.hidden, num_classes)

    def build(self, spec: dict, input_shape, num_classes: int) -> nn.Module:
        return MLP(input_shape, spec["widths"], num_classes)

    def _layers(self, spec: dict, input_shape, num_classes: int) -> list[tuple[int, int]]:
        widths = [math.prod(input_shape), *spec["widths"], num_classes]
        return list(zip(widths[:-1], widths[1:]))

    def macs(self, spec: dict, input_shape, num_classes: int) -> int:
        return sum(a * b for a, b in self._layers(spec, input_shape, num_classes))

    def params(self, spec: dict, input_shape, num_classes: int) -> int:
        return sum(a * b + b for a, b in self._layers(spec, input_shape, num_classes))


class ResNetSpace(ElasticSpace):
    example = '{"depths": [1, 1, 1], "widths": [[4], [8], [16]]}'

    def __init__(self, cfg: ModelConfig, depths: Sequence[int], ratios: Sequence[float]):
        self.channels, self.blocks, self.norm = list(cfg.channels), list(cfg.blocks), cfg.norm
        super().__init__(depths, ratios)

    def canonical(self, value: dict, key: str) -> dict:
        if set(value) != {"depths", "widths"}:
            raise UserError(f"{key}: an elastic_resnet spec has keys depths and widths, e.g. {self.example}")
        n = len(self.blocks)
        depths = [
            _int(d, 1, b, f"{key}.depths[{s}]")
            for s, (d, b) in enumerate(zip(_list(value["depths"], n, f"{key}.depths"), self.blocks))
        ]
        widths = _list(value["widths"], n, f"{key}.widths (one list per stage)")
        out = []
        for s, (d, c) in enumerate(zip(depths, self.channels)):
            stage = _list(widths[s], d, f"{key}.widths[{s}] (one width per kept block)")
            out.append([_int(m, 1, c, f"{key}.widths[{s}][{j}]") for j, m in enumerate(stage)])
        return {"depths": depths, "widths": out}

    def uniform(self, depth: int, ratio: float) -> dict:
        depths = [min(depth, b) for b in self.blocks]
        return {"depths": depths, "widths": [[kept(ratio, c)] * d for d, c in zip(depths, self.channels)]}

    def sample(self, rng: np.random.Generator) -> dict:
        depths = [min(self.choose(rng, self.depths), b) for b in self.blocks]
        widths = [
            [kept(self.choose(rng, self.ratios), c) for _ in range(d)] for d, c in zip(depths, self.channels)
        ]
        return {"depths": depths, "widths": widths}

    def _image(self, input_shape) -> tuple[int, ...]:
        from hpcfed.models.resnet import image_shape

        return image_shape("elastic_resnet", tuple(input_shape))

    def supernet(self, input_shape, num_classes: int) -> nn.Module:
        from hpcfed.models.resnet import ResNet

        return ResNet(
            self._image(input_shape), num_classes, tuple(self.blocks), tuple(self.channels), self.norm
        )

    def build(self, spec: dict, input_shape, num_classes: int) -> nn.Module:
        from hpcfed.models.resnet import ResNet

        shape = self._image(input_shape)
        return ResNet(
            shape, num_classes, tuple(spec["depths"]), tuple(self.channels), self.norm, spec["widths"]
        )

    def _convs(self, spec: dict, input_shape, num_classes: int):
        """(out, in, k, output pixels) of every convolution, then the classifier's (out, in)."""
        c, h, w = self._image(input_shape)
        convs = [(self.channels[0], c, 3, h * w)]
        cin = self.channels[0]
        for s, (d, cout) in enumerate(zip(spec["depths"], self.channels)):
            for j in range(d):
                if s > 0 and j == 0:  # stride 2, padding 1 (3x3) or 0 (1x1): both give ceil(h/2)
                    h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
                mid = spec["widths"][s][j]
                convs += [(mid, cin, 3, h * w), (cout, mid, 3, h * w)]
                if j == 0 and (s > 0 or cin != cout):
                    convs.append((cout, cin, 1, h * w))  # the projection shortcut
                cin = cout
        return convs, (num_classes, cin)

    def macs(self, spec: dict, input_shape, num_classes: int) -> int:
        convs, (out, cin) = self._convs(spec, input_shape, num_classes)
        return sum(o * i * k * k * px for o, i, k, px in convs) + out * cin

    def params(self, spec: dict, input_shape, num_classes: int) -> int:
        convs, (out, cin) = self._convs(spec, input_shape, num_classes)
        norm = 2 if self.norm == "group" else 0  # a scale and a shift per normalised channel
        return sum(o * i * k * k + norm * o for o, i, k, _ in convs) + out * cin + out


def elastic_space(cfg: ModelConfig, superfed: SuperFedConfig | None = None) -> ElasticSpace:
    """The elastic space of ``cfg`` (an elastic model) with ``superfed``'s choices (defaults if None);
    a UserError naming the key when they do not fit the supernet."""
    sf = superfed if superfed is not None else SuperFedConfig()
    ratios = list(sf.widths)
    if not ratios or any(not 0 < r <= 1 for r in ratios) or max(ratios) != 1:
        raise UserError(f"superfed.widths: ratios in (0, 1] including 1 (the supernet) (got {ratios})")
    if cfg.name == "elastic_mlp":
        if not cfg.hidden or any(h < 1 for h in cfg.hidden):
            raise UserError(f"model.hidden: elastic_mlp needs positive hidden widths (got {cfg.hidden})")
        most = len(cfg.hidden)
    elif cfg.name == "elastic_resnet":
        if cfg.norm == "batch":
            raise UserError(
                'model.norm: elastic_resnet takes "group" or "none" (BatchNorm is off in SuperFed)'
            )
        if not cfg.channels or any(c < 1 for c in cfg.channels):
            raise UserError(f"model.channels: positive channel counts per stage (got {cfg.channels})")
        if len(cfg.blocks) != len(cfg.channels) or any(b < 1 for b in cfg.blocks):
            raise UserError(
                f"model.blocks: one positive block count per stage of model.channels (got {cfg.blocks})"
            )
        most = max(cfg.blocks)
    else:
        raise UserError(
            f"model.name: {cfg.name!r} is not elastic; expected one of {', '.join(ELASTIC_MODELS)}"
        )
    depths = list(range(1, most + 1)) if sf.depths is None else list(sf.depths)
    if not depths or any(not 1 <= d <= most for d in depths) or max(depths) != most:
        raise UserError(
            f"superfed.depths: depths in [1, {most}] including {most} (the supernet) (got {depths})"
        )
    if cfg.name == "elastic_mlp":
        return MLPSpace(cfg.hidden, depths, ratios)
    return ResNetSpace(cfg, depths, ratios)


def check_job(job) -> None:
    """Job-level checks of the elastic keys; resolves ``model.subnet`` to an explicit spec, so the
    resolved job (config.toml) and ``build_model`` need no ``[superfed]`` table to rebuild it."""
    m = job.model
    elastic = m.name in ELASTIC_MODELS
    if job.algorithm == "superfed":
        if not elastic:
            raise UserError(
                f"algorithm 'superfed' needs model.name elastic_mlp or elastic_resnet (got {m.name!r})"
            )
        if m.subnet is not None:
            raise UserError("model.subnet trains one fixed subnet; leave it out with algorithm 'superfed'")
    if not elastic:
        if m.subnet is not None:
            raise UserError(
                f"model.subnet needs an elastic model.name ({', '.join(ELASTIC_MODELS)}), not {m.name!r}"
            )
        return
    space = elastic_space(m, job.superfed)
    if job.algorithm == "superfed":
        for i, value in enumerate(job.superfed.eval_subnets or []):
            space.resolve(value, f"superfed.eval_subnets[{i}]")
        if job.superfed.eval_subnets == []:
            raise UserError("superfed.eval_subnets is empty; leave it out for smallest, two middle, largest")
    if m.subnet is not None:
        m.subnet = space.resolve(m.subnet, "model.subnet")


def build_elastic_mlp(input_shape, num_classes: int, hidden=(128,), subnet=None) -> nn.Module:
    """``model.name = "elastic_mlp"``: SuperFed's MLP supernet, or ``model.subnet`` of it."""
    return build_elastic(
        ModelConfig(name="elastic_mlp", hidden=list(hidden), subnet=subnet), input_shape, num_classes
    )


def build_elastic_resnet(
    input_shape, num_classes: int, channels=(16, 32, 64), blocks=(3, 3, 3), norm="group", subnet=None
) -> nn.Module:
    """``model.name = "elastic_resnet"``: SuperFed's ResNet supernet, or ``model.subnet`` of it."""
    cfg = ModelConfig(
        name="elastic_resnet", channels=list(channels), blocks=list(blocks), norm=norm, subnet=subnet
    )
    return build_elastic(cfg, input_shape, num_classes)


def build_elastic(cfg: ModelConfig, input_shape, num_classes: int) -> nn.Module:
    """The supernet, or with ``cfg.subnet`` the standalone subnet holding the supernet's initial
    weights at its positions (so a fixed-subnet baseline starts where SuperFed's subnet starts)."""
    space = elastic_space(cfg)
    supernet = space.supernet(input_shape, num_classes)
    if cfg.subnet is None:
        return supernet
    sub = space.build(space.resolve(cfg.subnet, "model.subnet"), input_shape, num_classes)
    with torch.no_grad():
        for name, tensor in prefix_state(supernet.state_dict(), sub).items():
            sub.state_dict()[name].copy_(tensor)
    return sub


def prefix_state(supernet_state: dict, subnet: nn.Module) -> dict:
    """The subnet's ``state_dict`` cut from the supernet's (tensors or arrays): the leading block
    of each same-named entry. A KeyError names an entry the supernet lacks."""
    return {
        name: supernet_state[name][tuple(slice(0, n) for n in tensor.shape)]
        for name, tensor in subnet.state_dict().items()
    }


# --------------------------------------------------------------------------- index mapping


def prefix_index(supernet: FlatModel, subnet: FlatModel) -> np.ndarray:
    """For each element of ``subnet``'s flat vector, its position in ``supernet``'s: every tensor
    of the subnet is the leading block (a prefix along each axis) of the same-named tensor."""
    where = {n: (int(o), tuple(s)) for n, s, o in zip(supernet.names, supernet.shapes, supernet.offsets)}
    parts = []
    for name, shape in zip(subnet.names, subnet.shapes):
        if name not in where:
            raise ValueError(f"subnet tensor {name!r} is not in the supernet")
        offset, big = where[name]
        shape = tuple(shape)
        if len(shape) != len(big) or any(a > b for a, b in zip(shape, big)):
            raise ValueError(f"subnet tensor {name!r} {shape} does not fit the supernet's {big}")
        axes = np.ix_(*[np.arange(n) for n in shape]) if shape else ()
        parts.append(offset + np.ravel_multi_index(axes, big).ravel() if shape else np.array([offset]))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def extract(supernet_vector: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The subnet's flat vector from the supernet's."""
    return supernet_vector[index]


def scatter(supernet_vector: np.ndarray, index: np.ndarray, subnet_vector: np.ndarray) -> np.ndarray:
    """A copy of the supernet's vector with the subnet's positions replaced by ``subnet_vector``."""
    out = supernet_vector.copy()
    out[index] = subnet_vector
    return out


@dataclass
class Subnet:
    spec: dict
    module: nn.Module  # the standalone model of the spec's shape
    flat: FlatModel
    index: np.ndarray  # supernet position of every element of ``flat``
    macs: int  # one forward pass of one sample
    params: int


def make_subnet(
    space: ElasticSpace, spec: dict, supernet: FlatModel, input_shape, num_classes: int
) -> Subnet:
    # built from torch's global generator: fork it, so building never shifts anyone's draws
    with torch.random.fork_rng(devices=[]):
        module = space.build(spec, input_shape, num_classes).to(supernet.vector.device)
    flat = FlatModel(module)
    macs = space.macs(spec, input_shape, num_classes)
    return Subnet(spec, module, flat, prefix_index(supernet, flat), macs, flat.size)

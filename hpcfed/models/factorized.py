"""Factorised (SVD) forms of the models, and compact sub-models built from slices (PriSM).

A decomposable layer's weight, viewed as a matrix ``W`` (out × fan_in, fan_in = in·k·k for a
convolution), is factorised as ``W = U diag(s) Vᵀ = A B`` with ``A = U diag(√s)`` (out × r) and
``B = diag(√s) Vᵀ`` (r × fan_in), r = min(out, fan_in). Kernel ``i`` is the pair (column ``A[:, i]``,
row ``B[i]``). A compact sub-model keeps a subset S of the kernels: the layer becomes a k×k
convolution with |S| outputs (weights ``B[S]``), then a 1×1 convolution to the layer's outputs
(weights ``A[:, S]``) and the original bias; for a linear layer two linear maps. These are real
slices, so parameters, bytes, MACs and activation memory shrink with |S| (Niu et al. mask them).

:class:`FactorSpace` is the layout of the "factor-space" vector: the model's flat vector with every
factorised weight replaced by its A then B. :class:`SubModel` is one compact structure (one shape
per keep level) with its own :class:`~hpcfed.flat.FlatModel`; ``index(selection)`` maps each element
of its flat vector to a position of the factor-space vector, so sending a sub-model is a gather and
aggregating it a scatter with per-element weights.

The ``channels`` baseline (HeteroFL-style, Diao et al. 2021) uses the same machinery with no
factorised layer: every hidden width is cut to a prefix, and the factor space is the flat vector.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcfed.flat import FlatModel


def kept(ratio: float, n: int) -> int:
    """⌈ratio·n⌉, at least 1 (a tolerance keeps 0.2·5 = 1.0000000000000002 from becoming 2)."""
    return max(1, min(n, math.ceil(ratio * n - 1e-9)))


# --------------------------------------------------------------------------- which layers


def decomposable(module: nn.Module, layers: str) -> list[str]:
    """Names of the layers PriSM factorises: k×k convolutions (k > 1, ungrouped) with more than 3
    input channels (the image stem and 1×1 shortcuts stay whole, as in the authors' code), and for
    ``layers = "all"`` the linear layers except the classifier (the last linear layer)."""
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    names = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.groups == 1 and m.in_channels > 3 and max(m.kernel_size) > 1:
                names.append(name)
        elif isinstance(m, nn.Linear) and layers == "all" and name != linears[-1]:
            names.append(name)
    return names


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


# --------------------------------------------------------------------------- low-rank layers


class LowRankConv2d(nn.Module):
    """``conv`` with weight ``A[:, S] B[S]``: a k×k convolution to |S| channels (``v``), a 1×1
    convolution to ``out_kept`` channels (``u``), zero channels up to ``out_channels`` (the
    low-rank-activations option), then the original bias."""

    def __init__(self, conv: nn.Conv2d, rank: int, out_kept: int) -> None:
        super().__init__()
        self.out_channels, self.out_kept = conv.out_channels, out_kept
        self.v = nn.Conv2d(
            conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False
        )
        self.u = nn.Conv2d(rank, out_kept, 1, bias=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.u(self.v(x))
        if self.out_kept < self.out_channels:
            y = F.pad(y, (0, 0, 0, 0, 0, self.out_channels - self.out_kept))
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class LowRankLinear(nn.Module):
    """``linear`` with weight ``A[:, S] B[S]``: in → |S| (``v``) → ``out_kept`` (``u``), zero-padded
    to ``out_features``, plus the original bias."""

    def __init__(self, linear: nn.Linear, rank: int, out_kept: int) -> None:
        super().__init__()
        self.out_features, self.out_kept = linear.out_features, out_kept
        self.v = nn.Linear(linear.in_features, rank, bias=False)
        self.u = nn.Linear(rank, out_kept, bias=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.u(self.v(x))
        if self.out_kept < self.out_features:
            y = F.pad(y, (0, self.out_features - self.out_kept))
        return y if self.bias is None else y + self.bias


# --------------------------------------------------------------------------- the factor space


@dataclass
class FactorLayer:
    name: str  # module name, e.g. "layer1.0.conv1"
    out: int
    fan_in: int
    rank: int
    w: slice  # the weight's range in the model's flat vector
    a: int  # offset of A (out × rank, row-major) in the factor-space vector
    b: int  # offset of B (rank × fan_in, row-major)


class FactorSpace:
    """The factor-space layout of ``flat``'s model with the layers ``names`` factorised."""

    def __init__(self, flat: FlatModel, names: list[str]):
        wanted = {f"{n}.weight": n for n in names}
        self.flat_size = flat.size
        self.layers: list[FactorLayer] = []
        self.plain: dict[str, int] = {}  # tensor name -> its offset in the factor-space vector
        src, dst = [], []
        off = 0
        for tname, shape, start, end in zip(flat.names, flat.shapes, flat.offsets[:-1], flat.offsets[1:]):
            start, end = int(start), int(end)
            if tname in wanted:
                out, fan_in = int(shape[0]), int(np.prod(shape[1:]))
                r = min(out, fan_in)
                self.layers.append(
                    FactorLayer(wanted[tname], out, fan_in, r, slice(start, end), off, off + out * r)
                )
                off += r * (out + fan_in)
            else:
                self.plain[tname] = off
                src.append(np.arange(start, end))
                dst.append(np.arange(off, off + end - start))
                off += end - start
        self.size = off
        self.plain_src = np.concatenate(src) if src else np.zeros(0, np.int64)
        self.plain_dst = np.concatenate(dst) if dst else np.zeros(0, np.int64)

    def decompose(self, w: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(the factor-space vector in float64, each layer's singular values, descending).

        float64 SVD; each column of U is signed so that its largest-magnitude entry is positive
        (ties: the first), so the factors are a deterministic function of ``w``: every rank holds
        the same bits, and a resumed run re-derives them exactly."""
        f = np.empty(self.size, dtype=np.float64)
        f[self.plain_dst] = w[self.plain_src]
        svals = []
        for L in self.layers:
            W = torch.from_numpy(np.asarray(w[L.w], dtype=np.float64).reshape(L.out, L.fan_in))
            if L.out < L.fan_in:
                # LAPACK is column-major: the transposed (tall) view is 3-4x faster for wide W
                V, s, Uh = torch.linalg.svd(W.T, full_matrices=False)
                U, Vh = Uh.T, V.T
            else:
                U, s, Vh = torch.linalg.svd(W, full_matrices=False)
            pick = U.abs().argmax(dim=0)
            sign = torch.sign(U[pick, torch.arange(U.shape[1])])
            sign[sign == 0] = 1.0
            root = s.sqrt()
            A = U * (sign * root)
            B = (sign * root)[:, None] * Vh
            f[L.a : L.b] = A.numpy().ravel()
            f[L.b : L.b + L.rank * L.fan_in] = B.numpy().ravel()
            svals.append(s.numpy())
        return f, svals

    def recompose(self, f: np.ndarray) -> np.ndarray:
        """The model's flat float32 vector ``W = A B`` from a factor-space vector."""
        w = np.empty(self.flat_size, dtype=np.float32)
        w[self.plain_src] = f[self.plain_dst]
        for L in self.layers:
            A = f[L.a : L.b].reshape(L.out, L.rank)
            B = f[L.b : L.b + L.rank * L.fan_in].reshape(L.rank, L.fan_in)
            w[L.w] = (A @ B).ravel()
        return w


# --------------------------------------------------------------------------- compact sub-models


class SubModel:
    """One compact structure: its module, flat vector, and the gather map into the factor space.

    ``pieces`` lists, in the compact flat vector's order, where each tensor comes from:
    ``("plain", offset, n)``, ``("A", layer_index, out_kept)``, ``("B", layer_index)`` (their
    kernels chosen per client) or ``("fixed", index_array)`` (channel prefixes)."""

    def __init__(self, module: nn.Module, pieces: list[tuple], space: FactorSpace):
        self.module, self.pieces, self.space = module, pieces, space
        self.flat = FlatModel(module)
        self.params = self.flat.size

    def index(self, selection: list[np.ndarray] | None = None) -> np.ndarray:
        """Factor-space position of every element of the compact flat vector, for the kernels
        ``selection[i]`` (sorted indices) of factorised layer ``i``."""
        parts = []
        for piece in self.pieces:
            kind = piece[0]
            if kind == "plain":
                parts.append(np.arange(piece[1], piece[1] + piece[2]))
            elif kind == "fixed":
                parts.append(piece[1])
            else:
                L, S = self.space.layers[piece[1]], np.asarray(selection[piece[1]], dtype=np.int64)
                if kind == "B":
                    parts.append((L.b + S[:, None] * L.fan_in + np.arange(L.fan_in)).ravel())
                else:
                    parts.append((L.a + np.arange(piece[2])[:, None] * L.rank + S[None, :]).ravel())
        out = np.concatenate(parts)
        assert out.size == self.params
        return out


def prism_submodel(module: nn.Module, space: FactorSpace, keep: float, out_keep: float) -> SubModel:
    """The compact low-rank model keeping ⌈keep·r⌉ kernels of each factorised layer."""
    compact = copy.deepcopy(module)
    owners = {}
    for i, L in enumerate(space.layers):
        old = compact.get_submodule(L.name)
        cls = LowRankConv2d if isinstance(old, nn.Conv2d) else LowRankLinear
        _set_submodule(compact, L.name, cls(old, kept(keep, L.rank), kept(out_keep, L.out)))
        owners[L.name] = i
    sub = SubModel(compact.to(next(module.parameters()).device), [], space)
    for tname, shape in zip(sub.flat.names, sub.flat.shapes):
        if tname.endswith(".v.weight") and tname[: -len(".v.weight")] in owners:
            sub.pieces.append(("B", owners[tname[: -len(".v.weight")]]))
        elif tname.endswith(".u.weight") and tname[: -len(".u.weight")] in owners:
            sub.pieces.append(("A", owners[tname[: -len(".u.weight")]], int(shape[0])))
        else:
            sub.pieces.append(("plain", space.plain[tname], int(np.prod(shape))))
    return sub


# --------------------------------------------------------------------------- channel prefixes


def width_plan(module: nn.Module) -> tuple[dict, dict]:
    """How hidden widths are tied, for the channel-prefix baseline.

    Returns ``(links, norms)``: ``links[layer] = (in_group, out_group, expand)`` for every conv and
    linear layer (``expand``: features per input channel, e.g. a flatten of 4×4 maps), and
    ``norms[layer] = group``. Groups ``"input"`` and ``"classes"`` are never cut. A residual
    stream is one group, so a block's output and its identity shortcut stay the same width."""
    from hpcfed.models.cnn import ConvNet
    from hpcfed.models.mlp import MLP
    from hpcfed.models.resnet import ResNet

    links: dict[str, tuple[str, str, int]] = {}
    norms: dict[str, str] = {}
    if isinstance(module, MLP):
        prev = "input"
        for i in range(len(module.hidden)):
            links[f"hidden.{i}"] = (prev, f"h{i}", 1)
            prev = f"h{i}"
        links["output"] = (prev, "classes", 1)
    elif isinstance(module, ConvNet):
        links["conv1"] = ("input", "c1", 1)
        links["conv2"] = ("c1", "c2", 1)
        links["fc1"] = ("c2", "d", module.fc1.in_features // module.conv2.out_channels)
        links["fc2"] = ("d", "classes", 1)
    elif isinstance(module, ResNet):
        links["conv1"], norms["norm1"] = ("input", "s0", 1), "s0"
        stream = "s0"
        for stage in range(1, module.num_stages + 1):
            for j, block in enumerate(getattr(module, f"layer{stage}")):
                p = f"layer{stage}.{j}"
                out = f"{p}.out" if len(block.shortcut) else stream
                links[f"{p}.conv1"], norms[f"{p}.norm1"] = (stream, f"{p}.mid", 1), f"{p}.mid"
                links[f"{p}.conv2"], norms[f"{p}.norm2"] = (f"{p}.mid", out, 1), out
                if len(block.shortcut):
                    links[f"{p}.shortcut.0"], norms[f"{p}.shortcut.1"] = (stream, out, 1), out
                stream = out
        links["fc"] = (stream, "classes", 1)
    else:
        raise ValueError(f"no width plan for {type(module).__name__}")
    return links, norms


def channel_submodel(module: nn.Module, space: FactorSpace, keep: float, layers: str) -> SubModel:
    """HeteroFL-style: every hidden width produced by a conv (and, for ``layers = "all"``, by a
    linear layer) keeps its first ⌈keep·C⌉ channels (rounded up to whole GroupNorm groups)."""
    links, norms = width_plan(module)
    kinds = (nn.Conv2d,) if layers == "conv" else (nn.Conv2d, nn.Linear)
    width, cut, per_group = {}, set(), {}
    for name, (_, out, _) in links.items():
        m = module.get_submodule(name)
        width[out] = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        if out != "classes" and isinstance(m, kinds):
            cut.add(out)
    for name, group in norms.items():
        m = module.get_submodule(name)
        if isinstance(m, nn.GroupNorm):
            per_group[group] = m.num_channels // m.num_groups
    size = {}
    for g, c in width.items():
        n = kept(keep, c) if g in cut else c
        q = per_group.get(g, 1)
        size[g] = min(c, -(-n // q) * q)

    def prefix(group: str, expand: int = 1, full: int | None = None) -> np.ndarray:
        if group == "input":
            return np.arange(full)
        return (np.arange(size[group])[:, None] * expand + np.arange(expand)).ravel()

    compact = copy.deepcopy(module)
    dims: dict[str, list] = {}  # tensor name -> index array per axis
    for name, (gin, gout, expand) in links.items():
        m = module.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            i_idx, o_idx = prefix(gin, full=m.in_channels), prefix(gout)
            new = nn.Conv2d(len(i_idx), len(o_idx), m.kernel_size, m.stride, m.padding, m.dilation,
                            bias=m.bias is not None)  # fmt: skip
            dims[f"{name}.weight"] = [o_idx, i_idx, np.arange(m.kernel_size[0]), np.arange(m.kernel_size[1])]
        else:
            i_idx, o_idx = prefix(gin, expand, full=m.in_features), prefix(gout)
            new = nn.Linear(len(i_idx), len(o_idx), bias=m.bias is not None)
            dims[f"{name}.weight"] = [o_idx, i_idx]
        dims[f"{name}.bias"] = [o_idx]
        _set_submodule(compact, name, new)
    for name, group in norms.items():
        m, idx = module.get_submodule(name), prefix(group)
        if isinstance(m, nn.GroupNorm):
            new = nn.GroupNorm(len(idx) // per_group[group], len(idx), m.eps, m.affine)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(len(idx), m.eps, m.momentum, m.affine, m.track_running_stats)
        else:
            continue  # Identity
        for attr in ("weight", "bias", "running_mean", "running_var"):
            dims[f"{name}.{attr}"] = [idx]
        _set_submodule(compact, name, new)
    sub = SubModel(compact.to(next(module.parameters()).device), [], space)
    for tname, shape in zip(sub.flat.names, space_shapes(module, sub.flat.names)):
        axes = dims.get(tname) or [np.arange(n) for n in shape]
        local = np.ravel_multi_index(np.ix_(*axes), shape).ravel()
        sub.pieces.append(("fixed", space.plain[tname] + local))
    return sub


def space_shapes(module: nn.Module, names: list[str]) -> list[tuple[int, ...]]:
    """The original shapes of the named float tensors of ``module``."""
    table = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return [tuple(table[n].shape) for n in names]


# --------------------------------------------------------------------------- cost: MACs, memory


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one sample, over conv and linear layers."""
    total = [0]

    def hook(m, _inp, out):
        if isinstance(m, nn.Conv2d):
            total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += out.numel() * m.in_features

    handles = [
        m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        was = module.training
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, *input_shape, device=next(module.parameters()).device))
        module.train(was)
    finally:
        for h in handles:
            h.remove()
    return int(total[0])


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints two 'USDT ... profiler_start/stop' lines to fd 2 whatever its log level."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_training_bytes(
    module: nn.Module, input_shape: tuple[int, ...], num_classes: int, batch_size: int, momentum: float
) -> int:
    """Measured peak memory of one local SGD step on a batch: the resident parameters plus the
    peak of what torch allocates during forward, backward and the optimiser step (activations
    kept for backward, gradients, momentum buffers), from the profiler's allocation events.
    The parameters are left unchanged."""
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in module.parameters() if p.requires_grad]
    resident = sum(p.numel() * p.element_size() for p in module.parameters())
    saved = [p.detach().clone() for p in params]
    device = params[0].device
    x = torch.zeros(batch_size, *input_shape, device=device)
    y = torch.arange(batch_size, device=device) % num_classes
    opt = torch.optim.SGD(params, lr=1e-3, momentum=momentum)
    module.train()
    with torch.random.fork_rng(devices=[]), _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = F.cross_entropy(module(x), y)
            loss.backward()
            opt.step()
            del loss
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    peak = int(np.max(np.cumsum([b for _, b in events]), initial=0)) if events else 0
    return resident + peak

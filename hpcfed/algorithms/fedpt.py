"""FedPT: federated learning of partially trainable networks (Sidahmed, Xu et al., arXiv 2110.03450).

A fixed subset of the model's parameters is frozen for the whole run at its initial value. Server
and clients build the same initial model from the job's seed (the engine seeds torch before
building it), so frozen weights never travel: the global model that goes down, the client delta
that comes up, the round's Allreduce and the server optimiser all cover the trainable entries
only. Otherwise it is FedAvg (this class is FedAvg on that sub-vector: same local SGD, same
``[fedavg]`` server optimiser, same ``[compress]`` and ``[dp]``); with nothing frozen
(``trainable = ["*"]``) it is FedAvg bit for bit.

Frozen parameters get ``requires_grad_(False)`` and stay out of the optimiser: backward skips
their weight gradients (for a frozen first layer, the whole input-gradient chain too) and no
gradient or momentum buffer is allocated for them.

Aggregation uses one scalar weight per client on the trainable sub-vector, not per-element
weights over the whole model: every client trains the same subset, so per-element weights would be
a constant over it and zero elsewhere, doubling the collective for no information, while the
sub-vector layout also shrinks the round's Allreduce by |theta| / |theta_trainable|.

No public code exists; this is our reading of the abstract (``methods.md``). Where we differ or
choose: what to freeze is the job's (``[fedpt] freeze = "largest"``, the layer holding the most
parameters, or name globs; or ``trainable = [globs]``) where the paper studies chosen layers of
its models; the frozen weights use PyTorch's default initialisation like every model here; a
checkpoint stores the whole model (frozen part included) so it loads on its own. DP is DP-FedAvg
from ``dp.py``: FedPT's gain under DP is that the same per-coordinate noise covers fewer
coordinates (and never touches the frozen features).

Learning rate (issue 19): the paper's abstract does not say how the client lr relates to the
trainable share. A frozen random hidden layer makes the head a linear model on fixed features, a
convex problem whose useful step is far larger than the whole network's, so the job's
``train.lr`` (chosen for the whole model) starves it: on digits FedPT at lr 0.05 trails FedAvg by
6-9 points, and is flat within 2 points from lr 1 to 64. ``fedpt.lr_scale = "auto"`` therefore
multiplies the client lr by :data:`HEAD_LR_SCALE` for such a head without DP (``lr_scale = 1`` is
the plain reading). A frozen layer initialised at a larger scale ``c`` is the same lr change in
disguise (ReLU is positively homogeneous: a step on the head acts as ``lr x c^2``), so the init
stays PyTorch's. Measurements: docs/fedpt.md.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import cached_property

import numpy as np
import torch

from hpcfed.algorithms.fedavg import FedAvg
from hpcfed.config import FedPTConfig, JobConfig, UserError
from hpcfed.flat import FlatModel

# ``lr_scale = "auto"`` for a head on frozen layers, without DP. Measured on digits (MLP 64-128-10,
# hidden.0 frozen; benchmarks/bench_fedpt.py, 3 partitions x 3 seeds): the head's accuracy after 50
# rounds is flat within 2 points from client lr 1 to 64 and falls off below 1 (0.83 at 0.05, the
# whole model's default). 40 puts the default train.lr = 0.05 at lr 2, mid-plateau.
HEAD_LR_SCALE = 40.0


def largest_layer(flat: FlatModel) -> str:
    """The module holding the most parameters (the first of equals), e.g. ``fc1`` of the CNN."""
    params = dict(flat.module.named_parameters())
    sizes: dict[str, int] = {}
    for name in flat.names:
        if name in params:
            layer = name.rsplit(".", 1)[0] if "." in name else ""
            sizes[layer] = sizes.get(layer, 0) + params[name].numel()
    return max(sizes, key=lambda layer: sizes[layer])  # max keeps the first of equal sizes


def select_trainable(flat: FlatModel, cfg: FedPTConfig) -> list[str]:
    """The names in ``flat.names`` that train (the others are frozen), validated against the model."""
    names = flat.names
    if cfg.freeze == "largest":
        layer = largest_layer(flat)
        frozen = {n for n in names if n.startswith(layer + ".")} if layer else set(names)
    else:
        key = "fedpt.trainable" if cfg.trainable is not None else "fedpt.freeze"
        globs = cfg.trainable if cfg.trainable is not None else cfg.freeze
        for glob in globs:
            if not any(fnmatchcase(n, glob) for n in names):
                raise UserError(f"{key}: {glob!r} matches no parameter of the model ({', '.join(names)})")
        matched = {n for n in names if any(fnmatchcase(n, g) for g in globs)}
        frozen = set(names) - matched if cfg.trainable is not None else matched
    trainable = [n for n in names if n not in frozen]
    params = dict(flat.module.named_parameters())
    if not any(n in params for n in trainable):
        raise UserError("fedpt: every parameter is frozen; nothing would train")
    return trainable


def is_head(flat: FlatModel, trainable: list[str]) -> bool:
    """Whether something is frozen and every trainable parameter comes after every frozen one in
    the model's parameter order (registration order = forward order for hpcfed's models): the
    trainable part is then a head on fixed random features."""
    order = [n for n, _ in flat.module.named_parameters()]
    keep = set(trainable)
    frozen = [i for i, n in enumerate(order) if n not in keep]
    trained = [i for i, n in enumerate(order) if n in keep]
    return bool(frozen) and min(trained) > max(frozen)


def lr_scale(job: JobConfig, flat: FlatModel, trainable: list[str]) -> float:
    """The client lr multiplier ``fedpt.lr_scale`` resolves to (docs/fedpt.md, "Learning rate").

    "auto" is HEAD_LR_SCALE for a head on frozen layers without DP, else 1. A linear head on frozen
    features is a convex problem whose useful step is far larger than the whole network's (whose
    step the hidden layers limit), so the job's train.lr, chosen for the whole model, starves it.
    Under DP every update is clipped to S anyway, so S sets the step and a larger client lr only
    adds client drift to the clipped direction (measured at S <= 0.5: x4 0-2 points worse, x20
    1.5-17 worse)."""
    scale = job.fedpt.lr_scale
    if scale != "auto":
        return float(scale)
    return HEAD_LR_SCALE if job.dp is None and is_head(flat, trainable) else 1.0


class FedPT(FedAvg):
    name = "fedpt"

    @classmethod
    def check_job(cls, job) -> None:
        super().check_job(job)
        if job.fedpt.freeze is None and job.fedpt.trainable is None:
            raise UserError("algorithm 'fedpt' needs fedpt.freeze or fedpt.trainable")

    def __init__(self, job, flat: FlatModel, data, device, comm):
        self.trainable_names = select_trainable(flat, job.fedpt)
        keep = set(self.trainable_names)
        for name, param in flat.module.named_parameters():
            param.requires_grad_(name in keep)  # before FedAvg builds the optimiser from these
        ranges = [flat.slice_of(n) for n in self.trainable_names]
        self.index = np.concatenate([np.arange(s.start, s.stop) for s in ranges]).astype(np.int64)
        self._index_t = torch.from_numpy(self.index).to(flat.vector.device)
        # Frozen float buffers (e.g. BatchNorm statistics, if a glob names them) change in training
        # mode: each client starts from the seeded values, as a real client would.
        params = dict(flat.module.named_parameters())
        frozen_buffers = [flat.slice_of(n) for n in flat.names if n not in keep and n not in params]
        self._frozen_buffers = [(s, flat.vector[s].clone()) for s in frozen_buffers]
        self.lr_scale = lr_scale(job, flat, self.trainable_names)
        super().__init__(job, flat, data, device, comm)

    @cached_property
    def trainer(self):
        """Local SGD over the trainable parameters at train.lr x fedpt.lr_scale (the executor's
        vectorised groups read the same ``trainer.cfg``)."""
        from hpcfed.train import LocalSGD

        train = self.job.train
        if self.lr_scale != 1.0:
            train = train.model_copy(update={"lr": train.lr * self.lr_scale})
        return LocalSGD(self.flat.module, train)

    @property
    def trainable_size(self) -> int:
        return int(self.index.size)

    def layout(self) -> dict[str, int]:
        sizes = super().layout()
        sizes["value"] = self.trainable_size  # the Allreduce carries the trainable entries only
        return sizes

    # -- the trainable part (FedAvg's hooks) -----------------------------------------------------
    def part(self, model: np.ndarray) -> np.ndarray:
        return model[self.index]

    def with_part(self, model: np.ndarray, part: np.ndarray) -> np.ndarray:
        out = model.copy()
        out[self.index] = part
        return out

    def load_part(self, part: np.ndarray) -> None:
        vector = self.flat.vector
        with torch.no_grad():
            vector[self._index_t] = torch.as_tensor(part, dtype=torch.float32).to(vector.device)
            for s, seeded in self._frozen_buffers:
                vector[s] = seeded

    def read_parts(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors[:, self._index_t]

    def read_part(self) -> np.ndarray:
        return self.flat.vector.detach()[self._index_t].cpu().numpy()

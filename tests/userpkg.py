"""A package of user code, written into a folder by the tests (model, dataset, loss, strategies),
as a researcher's own ``mylab`` would be: hpcfed imports it from the job file's folder."""

from __future__ import annotations

import textwrap
from pathlib import Path

FILES = {
    "mylab/__init__.py": "",
    "mylab/nets.py": """
        import math
        import torch
        from torch import nn

        def build(input_shape, num_classes, width=32):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Tanh(),
                                 nn.Linear(width, num_classes))

        def not_a_module(input_shape, num_classes):
            return "a string"

        NOT_CALLABLE = 3

        def wrong_input(input_shape, num_classes):  # 7 inputs, whatever the data has
            return nn.Linear(7, num_classes)

        def regression(input_shape, num_classes):
            return nn.Linear(math.prod(input_shape), num_classes)
        """,
    "mylab/data.py": """
        import numpy as np
        import hpcfed

        def _arrays(seed, n=600, dim=12, classes=3):
            rng = np.random.default_rng(seed)
            centres = rng.normal(0, 2, (classes, dim))
            y = rng.integers(0, classes, n)
            x = centres[y] + rng.normal(0, 1, (n, dim))
            return x.astype(np.float32), y

        def pooled(seed, n=600):
            x, y = _arrays(seed, n)
            return hpcfed.FederatedData.pooled(train=(x[100:], y[100:]), test=(x[:100], y[:100]))

        def clients(seed, count=12):
            x, y = _arrays(seed)
            parts = np.array_split(np.arange(100, 600), count)
            return hpcfed.FederatedData.from_clients([(x[p], y[p]) for p in parts], test=(x[:100], y[:100]))

        def lazy(seed, count=12):
            x, y = _arrays(seed)
            parts = np.array_split(np.arange(100, 600), count)
            return hpcfed.FederatedData.lazy(
                sizes=[len(p) for p in parts], read_client=lambda c: (x[parts[c]], y[parts[c]]),
                test=(x[:100], y[:100]), input_shape=(12,), num_classes=3)

        def regression(seed):
            rng = np.random.default_rng(seed)
            x = rng.normal(size=(400, 5)).astype(np.float32)
            y = (x @ rng.normal(size=(5, 2))).astype(np.float32)
            return hpcfed.FederatedData.pooled(train=(x[80:], y[80:]), test=(x[:80], y[:80]))

        def impure(seed):  # the classic bug: an unseeded generator, different on every build
            return pooled(int(np.random.default_rng().integers(1 << 30)))

        def wrong_type(seed):
            return _arrays(seed)
        """,
    "mylab/losses.py": """
        import torch.nn.functional as F

        def smooth(outputs, targets):
            return F.cross_entropy(outputs, targets, label_smoothing=0.05)

        def cross_entropy_again(outputs, targets):
            return F.cross_entropy(outputs, targets)
        """,
    "mylab/algos.py": '''
        import numpy as np
        import pydantic
        import hpcfed
        from hpcfed.algorithms import FedAvg

        class HalfStep(FedAvg):
            """Built-in FedAvg with the server step halved."""
            def aggregate(self, total, round_index):
                return 0.5 * super().aggregate(total, round_index)

        class Scaled(FedAvg):
            class Options(pydantic.BaseModel):
                model_config = pydantic.ConfigDict(strict=True)
                scale: float = pydantic.Field(1.0, gt=0)
            def aggregate(self, total, round_index):
                return self.options.scale * super().aggregate(total, round_index)

        class FromScratch(hpcfed.Strategy):
            """Plain FedAvg written on the base Strategy alone: the docs' minimal algorithm."""
            def client_update(self, state, client_id, round_index):
                self.flat.set(state["model"])
                loss, steps, n = self.train_client(client_id, round_index)
                delta = self.flat.get().astype(np.float64) - state["model"]
                sent = 4 * delta.size  # float32 models each way
                metrics = {"loss_sum": loss * n, "samples": n, "bytes_up": sent, "bytes_down": sent}
                return hpcfed.Update(value=n * delta, weight=float(n), metrics=metrics)
            def server_update(self, state, total, round_index):
                if total.weight > 0:
                    state["model"] = (state["model"] + total.value / total.weight).astype(np.float32)
                return state

        class Boom(FedAvg):
            """Raises in round 1 for one client: a bug in user code mid-run."""
            class Options(pydantic.BaseModel):
                client: int = 0
            def client_update(self, state, client_id, round_index):
                if round_index == 1 and client_id == self.options.client:
                    raise ValueError(f"user bug in client {client_id}")
                return super().client_update(state, client_id, round_index)

        class NotAStrategy:
            pass
        ''',
}


def write_package(folder: Path) -> Path:
    """Write the package under ``folder`` (which becomes the job's folder); returns it."""
    for name, text in FILES.items():
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return Path(folder)


JOB = """
name = "{name}"
algorithm = "{algorithm}"
seed = 3
rounds = 6
clients_per_round = 4
eval_every = 2
checkpoint_every = 3

[data]
dataset = "{dataset}"
partition = "{partition}"
num_clients = 12

[model]
name = "{model}"

[train]
loss = "{loss}"
lr = 0.1
"""


def write_job(folder: Path, file: str = "job.toml", **keys) -> Path:
    values = dict(
        name="user", algorithm="fedavg", dataset="mylab.data:clients", partition="natural",
        model="mylab.nets:build", loss="mylab.losses:smooth",
    )  # fmt: skip
    values.update(keys)
    path = Path(folder) / file
    path.write_text(JOB.format(**values))
    return path

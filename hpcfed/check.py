"""``hpcfed check JOB.toml``: every exit-2 error of a job, found without training.

A cluster user runs it on a login node before queueing: the keys and references are validated
(as ``hpcfed run`` does on load), the dataset is built twice and the two compared (a dataset must
be a pure function of its seed), the model is built, one batch of the first client goes through
the model and ``train.loss`` (and backward), one batch of the test set through the evaluation,
and the strategy is constructed. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hpcfed.errors import UserError


def check_job(path: str, overrides: Sequence[str] = ()) -> str:
    """A summary of the checked job, or UserError naming what is wrong."""
    import torch
    from mpi4py import MPI

    from hpcfed import registry
    from hpcfed.algorithms import make_strategy
    from hpcfed.comm import choose_device
    from hpcfed.config import load_job
    from hpcfed.data import load_federated
    from hpcfed.flat import FlatModel
    from hpcfed.models import build_model
    from hpcfed.runner import job_references
    from hpcfed.train import evaluate_sums, job_loss

    job = load_job(path, list(overrides))
    registry.add_search_path(job.job_dir)
    loss = job_loss(job.train)
    data = load_federated(job.data, job.seed)
    again = load_federated(job.data, job.seed)
    if data.fingerprint() != again.fingerprint():
        raise UserError(
            f"data.dataset = {job.data.dataset!r}: two builds with seed {job.seed} differ; a dataset must be "
            "a pure function of (seed, data.options): seed every random choice from the seed argument"
        )
    torch.manual_seed(job.seed)
    model = build_model(job.model, data.input_shape, data.num_classes)
    x, y = data.client(int(np.argmax(data.client_sizes > 0)))
    batch = slice(0, job.train.batch_size)
    try:
        outputs = model(x[batch])
        value = loss(outputs, y[batch])
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise UserError(
                f"train.loss = {job.train.loss!r}: returned {type(value).__name__}"
                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}; expected a scalar tensor"
            )
        value.backward()
        tx, ty = data.test
        evaluate_sums(model, tx[: batch.stop], ty[: batch.stop], loss=loss)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the shapes do not fit: name the keys involved
        raise UserError(
            f"model.name = {job.model.name!r} with train.loss = {job.train.loss!r}: one batch of inputs "
            f"{tuple(x[batch].shape)} and targets {tuple(y[batch].shape)} failed: {type(exc).__name__}: {exc}"
        ) from None
    flat = FlatModel(model)
    strategy = make_strategy(job, flat, data, choose_device(job.device), MPI.COMM_SELF)
    user = registry.user_code(job_references(job))
    lines = [
        f"{path}: ok",
        f"  data       {data!r}",
        f"  model      {job.model.name}: {flat.size:,} float parameters, outputs {tuple(outputs.shape[1:])}",
        f"  loss       {job.train.loss}: {value.item():.4f} on one batch of {y[batch].shape[0]}",
        f"  algorithm  {job.algorithm} ({type(strategy).__module__}.{type(strategy).__name__})",
        f"  run folder {job.run_dir}",
    ]
    lines += [f"  user code  {k} = {v['reference']} ({v['file']})" for k, v in user.items()]
    return "\n".join(lines)

"""``hpcfed export RUN_DIR --subnet SPEC -o FILE.h5``: one subnet of a SuperFed family on its own.

The run's newest valid checkpoint holds the supernet; the subnet's weights are the leading block of
each tensor (see :mod:`hpcfed.models.elastic`). The output is a checkpoint in the usual format
(``model/`` group, atomic write) whose ``model/`` loads with ``strict=True`` into the plain model
of the subnet's shape, i.e. ``build_model`` of the run's ``[model]`` with ``subnet = SPEC``.
Attributes: ``subnet`` (the spec as JSON), ``macs``, ``params``, ``source`` (the checkpoint it came
from), and the usual ``round``, ``algorithm``, ``config``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcfed.config import UserError, read_toml, validate


def export_subnet(run_dir: Path, spec_value: str, out: Path) -> tuple[Path, dict]:
    """Write ``out``; returns (its path, the resolved spec). Bad input is a UserError."""
    from hpcfed.data import load_federated
    from hpcfed.io.checkpoint import load_latest, write_checkpoint
    from hpcfed.models.elastic import ELASTIC_MODELS, elastic_space, prefix_state, spec_text

    run_dir, out = Path(run_dir), Path(out)
    config = run_dir / "config.toml"
    if not config.is_file():
        raise UserError(f"{config}: not found; is {run_dir} an hpcfed run folder?")
    job = validate(read_toml(config), str(config))
    if job.model.name not in ELASTIC_MODELS or job.model.subnet is not None:
        raise UserError(
            f"{run_dir}: export needs a run that trained an elastic supernet (algorithm superfed); "
            f"this one trained model.name = {job.model.name!r}"
            + (f" with model.subnet = {job.model.subnet}" if job.model.subnet is not None else "")
        )
    space = elastic_space(job.model, job.superfed)
    spec = space.resolve(spec_value, "--subnet")
    ckpt = load_latest(run_dir)
    data = load_federated(job.data, job.seed)  # input shape and classes of the subnet's model
    module = space.build(spec, data.input_shape, data.num_classes)
    try:
        state = {k: np.ascontiguousarray(v) for k, v in prefix_state(ckpt.model, module).items()}
    except KeyError as exc:
        raise UserError(f"{ckpt.path}: no tensor {exc} for this subnet (not this run's supernet?)") from None
    attrs = {
        "algorithm": ckpt.attrs.get("algorithm", job.algorithm),
        "config": ckpt.attrs.get("config", ""),
        "subnet": spec_text(spec),
        "macs": space.macs(spec, data.input_shape, data.num_classes),
        "params": space.params(spec, data.input_shape, data.num_classes),
        "source": str(ckpt.path),
    }
    return write_checkpoint(out, ckpt.round, attrs, state, {}), spec

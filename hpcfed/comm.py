"""The few collective helpers: the world communicator, one packed Allreduce, device choice.

Architecture principle 5: the communicator is passed in explicitly, tensors move with mpi4py's
upper-case buffer calls on contiguous arrays, and every collective is reached by all ranks in the
same order. A round's whole contribution (update values, per-element weights, metric sums and the
stop flag) travels in ONE float64 buffer, so a round costs one collective. float64 accumulation
keeps the result independent of the rank count up to ~1e-12 relative, well below float32's step.
"""

from __future__ import annotations

import os

import numpy as np

_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS")


def world():
    """mpi4py's COMM_WORLD (size 1 when started without mpirun/srun)."""
    # A singleton (no launcher) talks to nobody: Open MPI probing its network transports costs
    # about 1 s of MPI_Init here, and only the self transport is needed. A user's own setting
    # wins, other MPIs ignore the variable, and it is removed again once MPI is initialised so
    # that processes this one starts (an mpirun in a test, say) do not inherit it.
    singleton = not any(v in os.environ for v in _LAUNCHER_VARS) and "OMPI_MCA_btl" not in os.environ
    if singleton:
        os.environ["OMPI_MCA_btl"] = "self"
    try:
        from mpi4py import MPI  # imported here: MPI_Init happens on first use, not at package import
    finally:
        if singleton:
            del os.environ["OMPI_MCA_btl"]

    return MPI.COMM_WORLD


class PackedAllreduce:
    """Sum named float64 arrays over all ranks with a single in-place ``Allreduce``.

    The layout (names, sizes, order) must be the same on every rank; it is fixed at construction
    and the buffer is reused every round, so nothing is allocated on the hot path. Zeroing is lazy:
    a field's first :meth:`add` of a round copies instead of adding to zeros, which saves a pass
    over the model-sized fields (at a million parameters that pass costs about as much as the
    Allreduce itself on one node); fields nobody touched are zeroed just before the collective.
    """

    def __init__(self, comm, sizes: dict[str, int]):
        self.comm = comm
        self.slices: dict[str, slice] = {}
        offset = 0
        for name, size in sizes.items():
            self.slices[name] = slice(offset, offset + size)
            offset += size
        self.buffer = np.zeros(offset, dtype=np.float64)
        self._unset: set[str] = set()  # fields whose content is stale: logically zero

    def view(self, name: str) -> np.ndarray:
        """The field, ready for in-place updates (zeroed first if this round has not touched it)."""
        out = self.buffer[self.slices[name]]
        if name in self._unset:
            out.fill(0.0)
            self._unset.discard(name)
        return out

    def add(self, name: str, x) -> None:
        """``field += x`` (an array of the field's size, or a scalar)."""
        out = self.buffer[self.slices[name]]
        if name in self._unset:
            np.copyto(out, x)
            self._unset.discard(name)
        else:
            np.add(out, x, out=out)

    def zero(self) -> None:
        self._unset = set(self.slices)

    def allreduce(self) -> dict[str, np.ndarray]:
        for name in self._unset:
            self.buffer[self.slices[name]].fill(0.0)
        self._unset.clear()
        if self.comm.Get_size() > 1:
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, self.buffer, op=MPI.SUM)
        return {name: self.buffer[s] for name, s in self.slices.items()}


_STREAM_TAG = 0x4843  # "HC": named arrays streamed to one rank (checkpoints)


def send_arrays(comm, items, dest: int) -> None:
    """Send ``(name, array)`` pairs to ``dest`` one at a time: a small pickled header (name, dtype,
    shape), then the array with the upper-case buffer call; ``None`` ends the stream. The sender
    never materialises more than one array (``items`` may be a generator reading from disk)."""
    for name, arr in items:
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:  # (not np.ascontiguousarray: it turns 0-d arrays into 1-d)
            arr = arr.copy(order="C")
        comm.send((name, arr.dtype.str, arr.shape), dest=dest, tag=_STREAM_TAG)
        comm.Send(arr, dest=dest, tag=_STREAM_TAG + 1)
    comm.send(None, dest=dest, tag=_STREAM_TAG)


def recv_arrays(comm, source: int):
    """The receiving end of :func:`send_arrays`: a generator of ``(name, array)``, lazy, so the
    receiver can write each array out before the next arrives."""
    while True:
        header = comm.recv(source=source, tag=_STREAM_TAG)
        if header is None:
            return
        name, dtype, shape = header
        arr = np.empty(shape, dtype=np.dtype(dtype))
        comm.Recv(arr, source=source, tag=_STREAM_TAG + 1)
        yield name, arr


def allreduce_sum(comm, values: np.ndarray) -> np.ndarray:
    """Sum a small float64 array over ranks (evaluation counts); a copy is returned."""
    out = np.ascontiguousarray(values, dtype=np.float64).copy()
    if comm.Get_size() > 1:
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
    return out


def agreed(exc: BaseException) -> bool:
    """Whether every rank is leaving with ``exc`` (or a RankFailed of it): nobody is left waiting."""
    return getattr(exc, "hpcfed_agreed", False)


def _agreed(exc: BaseException) -> BaseException:
    exc.hpcfed_agreed = True
    return exc


def raise_together(comm, failure: BaseException | None, payload=None) -> list:
    """Collective, called by every rank at the same point: ``failure`` is this rank's exception
    or None. If any rank failed, every rank raises: the lowest failing rank its own exception
    (it reports it: one traceback, or one error line), every other rank :class:`RankFailed`
    naming it, with the exit code its error means (2 for a UserError, else 1). Otherwise returns
    every rank's ``payload`` (one allgather; nothing is sent when there is one rank)."""
    from hpcfed.errors import RankFailed, UserError

    code = None if failure is None else (2 if isinstance(failure, UserError) else 1)
    gathered = comm.allgather((code, payload)) if comm.Get_size() > 1 else [(code, payload)]
    failed = [rank for rank, (c, _) in enumerate(gathered) if c is not None]
    if not failed:
        return [p for _, p in gathered]
    first = failed[0]
    if comm.Get_rank() == first:
        raise _agreed(failure)
    raise _agreed(RankFailed(first, gathered[first][0])) from failure


def local_rank() -> int:
    """The rank on this node, from the launcher (SLURM or Open MPI or MPICH), else 0."""
    for var in ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def choose_device(preference: str):
    """``cuda:<local rank>`` when CUDA is present (or asked for), else the CPU.

    Untested here (no GPU on the development machine): MPI always sees host buffers, because the
    engine copies flat vectors to the host before every collective.
    """
    import torch

    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from hpcfed.config import UserError

        raise UserError("device = 'cuda' but torch sees no CUDA device")
    return torch.device(f"cuda:{local_rank() % torch.cuda.device_count()}")

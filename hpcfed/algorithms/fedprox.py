"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, arXiv
1812.06127).

FedAvg whose local objective adds a proximal term, ``F_k(w) + mu/2 ||w - w_t||^2``, keeping each
client's local model near the global model ``w_t`` it started from; the gradient of the term,
``mu (w - w_t)``, is added to every local step (:class:`hpcfed.train.GradientCorrection`). The
server step is FedAvg's (so ``[fedavg]`` server optimisers, ``[compress]``, ``[dp]``, ``[robust]``
and ``[faults]`` all apply), and ``mu = 0`` is FedAvg bit for bit (no correction is built).

Partial work is kept, as the paper does: a straggler (``[faults] slow_prob``) runs only part of its
local steps (``slow_work``) and its update still joins the average (the paper's "γ-inexact"
solutions), where FedAvg with the paper's drop policy would discard it. hpcfed's FedAvg keeps
stragglers' partial updates too, so the comparison of the two isolates the proximal term.

Where we differ: the paper's local solver is plain SGD for a fixed number of epochs; ours is the
job's ``[train]`` SGD (momentum and weight decay allowed, both added to the corrected gradient by
torch's SGD rule). The paper weights clients by sample count, as we do.
"""

from __future__ import annotations

from hpcfed.algorithms.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def begin_round(self, state, round_index):
        super().begin_round(state, round_index)
        mu = self.job.fedprox.mu
        # the anchor is the model every client receives this round (FedPT-style parts aside)
        self._prox = self.correction(prox_mu=mu, anchor=state["model"]) if mu > 0 else None

    def local_training(self, client_id, round_index):
        return self.train_client(client_id, round_index, correction=self._prox)

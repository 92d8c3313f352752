"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020, arXiv 2007.07481).

Clients that take different numbers of local steps τ_i (different sizes, epochs, stragglers) pull
FedAvg's average towards the objectives of the clients that step most. FedNova normalises each
client's update by its own step count before averaging and rescales by an effective step count:

    d_i = (w_i - w) / a_i,        τ_eff = Σ p_i a_i,        w ← w + τ_eff · Σ p_i d_i

with p_i the client's share of the round's samples and a_i = τ_i for plain local SGD, or, with
local momentum ρ (``train.momentum``), a_i = (τ_i − ρ(1 − ρ^τ_i)/(1 − ρ)) / (1 − ρ) (the paper's
momentum case). The sums Σ n_i d_i, Σ n_i and Σ n_i a_i travel in the round's one Allreduce
(``a_weighted`` as an extra sum). When every client takes the same steps, FedNova is FedAvg
(to float rounding). The result is the ``aggregate`` step, so FedAvg's server optimisers
(``[fedavg]``: momentum, the adaptive ones) apply on top, as the paper's FedNova with server
momentum does.

Where we differ: weight decay is left out of a_i (the paper's a_i covers plain and momentum SGD
only); ``[compress]`` compresses the raw delta w_i - w, which is then normalised by the server-side
sum (a_i is one number per client; its 8 bytes are counted). Not with ``[dp]`` (the normalisation
changes each update's sensitivity) nor ``[robust]`` (a median of normalised deltas is not FedNova).
"""

from __future__ import annotations

import numpy as np

from hpcfed.algorithms.base import Update, weighted_mean
from hpcfed.algorithms.fedavg import FedAvg


def normaliser(steps: int, momentum: float) -> float:
    """a_i: the norm of the client's accumulated step weights (τ_i without momentum)."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class FedNova(FedAvg):
    name = "fednova"
    supports_dp = False
    supports_robust = False
    extra_sums = {"a_weighted": 1}

    def client_update(self, state, client_id, round_index) -> Update:
        update = super().client_update(state, client_id, round_index)  # value = n · delta
        a = normaliser(self.last_steps, self.job.train.momentum)
        n = float(update.weight)
        update.value = update.value / a  # n · d_i
        update.extras = {"a_weighted": n * a}
        update.metrics["bytes_up"] += 8  # a_i travels with the delta
        return update

    def aggregate(self, total: Update, round_index: int) -> np.ndarray:
        weight = float(np.asarray(total.weight).item())
        if weight <= 0:
            return np.zeros(total.value.size)
        tau_eff = float(np.asarray(total.extras["a_weighted"]).item()) / weight
        return tau_eff * weighted_mean(total, np.zeros(total.value.size))

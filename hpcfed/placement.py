"""Which rank trains which of the round's clients.

``balanced``: longest-processing-time-first greedy by cost (Graham 1969): costliest client first,
each to the least-loaded rank, ties to the lower rank. Ranks then finish a round together, and
every rank computes the same assignment from the same cohort without talking. A client's cost is
its number of SGD steps plus one (:func:`training_cost`), not its sample count: at FL client sizes a
step costs about the same whether its batch is full or not, and every client has a fixed cost
(loading the model, encoding its update) of about one step. Measured on digits with the CNN
(5 epochs, 20 clients a round, 2 ranks): 1.35x with sample counts, see BENCHMARKS.md for steps.
``fixed``: client c always lives on rank c mod size, for methods whose per-client state must stay
on a home rank (ResFed trajectories, HADFL devices).
"""

from __future__ import annotations

import heapq

import numpy as np


def training_cost(sizes: np.ndarray, epochs: int, batch_size: int) -> np.ndarray:
    """A client's cost in units of one SGD step: ``epochs * ceil(n / batch_size) + 1``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return epochs * -(-sizes // batch_size) + 1


def assign_balanced(clients: np.ndarray, costs: np.ndarray, size: int) -> list[list[int]]:
    order = sorted(range(len(clients)), key=lambda i: (-float(costs[i]), int(clients[i])))
    heap = [(0.0, r) for r in range(size)]
    out: list[list[int]] = [[] for _ in range(size)]
    for i in order:
        load, r = heapq.heappop(heap)
        out[r].append(int(clients[i]))
        heapq.heappush(heap, (load + float(costs[i]), r))
    return [sorted(c) for c in out]


def assign_fixed(clients: np.ndarray, size: int) -> list[list[int]]:
    return [sorted(int(c) for c in clients if c % size == r) for r in range(size)]


def assign(clients: np.ndarray, costs: np.ndarray, size: int, mode: str) -> list[list[int]]:
    if mode == "fixed":
        return assign_fixed(clients, size)
    return assign_balanced(clients, costs, size)


def assign_groups(
    clients: np.ndarray, costs: np.ndarray, size: int, mode: str, group: int
) -> list[list[list[int]]]:
    """Each rank's groups of clients trained at once (hpcfed/executor.py); ``group = 1``: one
    client a group, exactly :func:`assign`.

    ``balanced``: the groups are cut from the cohort alone, never from the rank count: clients
    sorted by cost (so a group's clients take similar numbers of steps and little is padded), cut
    into runs of ``group``, and the groups placed whole by the same greedy rule on their summed
    cost (a vectorised client's last bits depend on its group, never on the rank count). ``fixed``
    placement trains one client at a time (hpcfed/executor.py)."""
    if group <= 1 or mode == "fixed":
        return [[[c] for c in mine] for mine in assign(clients, costs, size, mode)]
    if len(clients) <= group:  # one group: the greedy rule puts it on rank 0
        return [[sorted(int(c) for c in clients)]] + [[] for _ in range(size - 1)]
    order = sorted(range(len(clients)), key=lambda i: (-float(costs[i]), int(clients[i])))
    groups = [sorted(int(clients[i]) for i in order[s : s + group]) for s in range(0, len(order), group)]
    cost_of = {int(c): float(k) for c, k in zip(clients, costs)}
    group_costs = [sum(cost_of[c] for c in g) for g in groups]
    ids = np.arange(len(groups))
    placed = assign_balanced(ids, np.array(group_costs), size)
    return [[groups[g] for g in mine] for mine in placed]

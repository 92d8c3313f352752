"""Which rank trains which of the round's clients.

``balanced``: longest-processing-time-first greedy by sample count (Graham 1969): biggest client
first, each to the least-loaded rank, ties to the lower rank. Ranks then finish a round together,
and every rank computes the same assignment from the same cohort without talking.
``fixed``: client c always lives on rank c mod size, for methods whose per-client state must stay
on a home rank (ResFed trajectories, HADFL devices).
"""

from __future__ import annotations

import heapq

import numpy as np


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

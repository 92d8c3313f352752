"""The digits FedAvg workload in Flower's simulation (Ray, one actor), for bench_flower.py.

Runs in Flower's own virtualenv (it never imports hpcfed): everything that must match hpcfed's run
(client partitions, test set, initial weights, each round's cohort, each client's batch-order seed)
comes from an .npz that bench_flower.py exports from hpcfed. So both systems train the same
clients in the same order from the same model, and their accuracies must agree: the difference
in time and memory is framework overhead only.

    python flower_digits.py WORKLOAD.npz RESULT.json
"""

from __future__ import annotations

import json
import sys
import time

import flwr as fl
import numpy as np
import torch
import torch.nn.functional as F
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import FedAvg

torch.set_num_threads(1)
PATH, OUT = sys.argv[1], sys.argv[2]
W = dict(np.load(PATH))  # the driver's copy; Ray workers read the file themselves (see Client)
ROUNDS, PER_ROUND = W["cohorts"].shape
LR, BATCH, EPOCHS, EVAL_EVERY = float(W["lr"]), int(W["batch"]), int(W["epochs"]), int(W["eval_every"])
HIDDEN = int(W["hidden"])


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))


def set_weights(net, arrays) -> None:
    with torch.no_grad():
        for p, a in zip(net.parameters(), arrays):
            p.copy_(torch.from_numpy(np.asarray(a)))


class Client(fl.client.NumPyClient):
    """Loads its partition from the file, as Flower's examples load theirs in ``client_fn``
    (closing over the driver's arrays would ship them to the actor with every task)."""

    def __init__(self, cid: int, path: str):
        with np.load(path) as w:
            start, end = w["client_start"][cid], w["client_start"][cid + 1]
            self.x = torch.from_numpy(w["x_train"][start:end])
            self.y = torch.from_numpy(w["y_train"][start:end])
            self.cohorts, self.seeds = w["cohorts"], w["batch_seeds"]
        self.cid = cid
        self.net = model()

    def fit(self, parameters, config):
        rnd = int(config["round"]) - 1  # Flower counts rounds from 1
        set_weights(self.net, parameters)
        opt = torch.optim.SGD(self.net.parameters(), lr=LR)
        slot = list(self.cohorts[rnd]).index(self.cid)
        gen = torch.Generator().manual_seed(int(self.seeds[rnd, slot]))
        self.net.train()
        for _ in range(EPOCHS):
            order = torch.randperm(self.x.shape[0], generator=gen)
            for s in range(0, self.x.shape[0], BATCH):
                i = order[s : s + BATCH]
                opt.zero_grad()
                F.cross_entropy(self.net(self.x[i]), self.y[i]).backward()
                opt.step()
        return [p.detach().numpy().copy() for p in self.net.parameters()], int(self.x.shape[0]), {}


def client_fn(context):
    return Client(int(context.node_config["partition-id"]), PATH).to_client()


class SameCohorts(FedAvg):
    """FedAvg whose round t trains exactly hpcfed's cohort t (Flower samples on its own otherwise)."""

    def configure_fit(self, server_round, parameters, client_manager):
        by_partition = {int(p.partition_id): p for p in client_manager.all().values()}
        fit = fl.common.FitIns(parameters, {"round": server_round})
        return [(by_partition[int(c)], fit) for c in W["cohorts"][server_round - 1]]


accuracies: dict[int, float] = {}
x_test, y_test = torch.from_numpy(W["x_test"]), torch.from_numpy(W["y_test"])


def evaluate(server_round, arrays, config):
    if server_round == 0 or server_round % EVAL_EVERY:
        return None
    net = model()
    set_weights(net, arrays)
    with torch.no_grad():
        logits = net(x_test)
    accuracies[server_round] = float((logits.argmax(1) == y_test).float().mean())
    return float(F.cross_entropy(logits, y_test)), {"accuracy": accuracies[server_round]}


start = time.perf_counter()
strategy = SameCohorts(
    fraction_fit=1.0,
    fraction_evaluate=0.0,
    min_fit_clients=PER_ROUND,
    min_available_clients=int(W["num_clients"]),
    initial_parameters=ndarrays_to_parameters([W[f"init_{i}"] for i in range(4)]),
    evaluate_fn=evaluate,
)
fl.simulation.start_simulation(
    client_fn=client_fn,
    num_clients=int(W["num_clients"]),
    config=fl.server.ServerConfig(num_rounds=ROUNDS),
    strategy=strategy,
    client_resources={"num_cpus": 1, "num_gpus": 0.0},
    ray_init_args={"num_cpus": 1, "include_dashboard": False, "log_to_driver": False},
)
elapsed = time.perf_counter() - start
with open(OUT, "w") as f:
    json.dump({"simulation_seconds": elapsed, "accuracy": accuracies}, f)

"""A FedAvg variant in one short module: the server learning rate decays every round.

    server step_t = server_lr * decay**t * (average client delta)

It subclasses the built-in FedAvg and overrides one hook, ``aggregate`` (the round's average
client delta, before the server optimiser), so compression, [faults], [dp] and checkpoints keep
working. Its own keys live in the job's [strategy] table and are validated by ``Options``.
"""

import pydantic

from hpcfed.algorithms import FedAvg


class FedAvgDecay(FedAvg):
    name = "fedavg_decay"

    class Options(pydantic.BaseModel):
        decay: float = pydantic.Field(0.98, gt=0, le=1)

    def aggregate(self, total, round_index):
        # self.options is the validated [strategy] table; the state is replicated on every rank,
        # and this runs on every rank with the same totals, so every rank takes the same step
        return self.options.decay**round_index * super().aggregate(total, round_index)

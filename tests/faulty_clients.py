"""ClientApps for the fault-tolerance and robustness tests. ``app``: the project's client, except that
partition 0 raises in round 1 and partition 1 always sends an update full of NaN. ``attack_app``: partition
0 sends a sign-flipped update boosted x10. Imported by Ray's workers by name, so they live in their own
module (tests/ is put on PYTHONPATH by the test)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedhubert.federation import client_app as real

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    if partition_id == 0 and int(msg.content["config"]["server-round"]) == 1:
        raise RuntimeError("planted failure of client 0 in round 1")
    reply = real.train(msg, context)
    if partition_id == 1:
        arrays = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord({k: Array(np.full(a.shape, np.nan, dtype=a.dtype))
                                               for k, a in arrays.items()})
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)


# --- an attacker for the robust-aggregation test -------------------------------------------------------
attack_app = ClientApp()
ATTACK_SCALE = -10.0  # partition 0 sends global + ATTACK_SCALE x (its honest update): sign-flipped, boosted x10


@attack_app.train()
def attack_train(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    if int(context.node_config["partition-id"]) == 0:
        sent, trained = msg.content["arrays"], reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord({k: Array(sent[k].numpy() + ATTACK_SCALE * (a.numpy() - sent[k].numpy()))
                                               for k, a in trained.items()})
    return reply


@attack_app.evaluate()
def attack_evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)

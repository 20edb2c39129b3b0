"""A ClientApp for the federated k-means fault test: the project's k-means client, except that
partition 0 raises in round 1 and partition 1 sends NaN sums in round 2. Imported by Ray's workers
by name, so it lives in its own module (tests/ is put on PYTHONPATH by the test)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from fedhubert.federation import kmeans_app as real

app = ClientApp()
app.train("kmeans_init")(real.kmeans_init)
app.query("kmeans_label")(real.kmeans_label)


@app.train("kmeans_stats")
def kmeans_stats(msg: Message, context: Context) -> Message:
    partition_id, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
    if partition_id == 0 and rnd == 1:
        raise RuntimeError("planted failure of client 0 in round 1")
    reply = real.kmeans_stats(msg, context)
    if partition_id == 1 and rnd == 2:
        sums = reply.content["arrays"]["sums"].numpy()
        reply.content["arrays"]["sums"] = Array(np.full(sums.shape, np.nan, dtype=sums.dtype))
    return reply

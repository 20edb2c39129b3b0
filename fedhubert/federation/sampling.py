"""The order in which the server samples clients: by partition, not by node id.

Flower draws a step's clients with ``random.sample(grid.get_node_ids(), n)`` (``sample_nodes``), but a
node's id is drawn at random when it registers (os.urandom in the simulation, the SuperLink's in a
deployment): a seeded draw would pick other partitions in every run. Used by the pretraining and
distillation server (server_app.py) and by the federated k-means (kmeans_app.py) whenever fewer clients
than all are sampled with a seed.
"""

from __future__ import annotations

import math
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedhubert.federation.replies import PARTITION_KEY

PARTITION_QUERY = "query.partition"  # the ClientApp answers with its partition-id (client_app.partition)


class PartitionOrder:
    """The Grid as Flower's sampling sees it: the node ids in partition order. Each node is asked its
    partition once; one that does not answer comes after the others, by node id. Everything else is the
    wrapped Grid's."""

    def __init__(self, grid: Grid, timeout: float | None) -> None:
        self.grid, self.timeout = grid, timeout
        self.partitions: dict[int, float] = {}  # node id -> partition id (inf: did not say)

    def get_node_ids(self) -> list[int]:
        nodes = list(self.grid.get_node_ids())
        unknown = [n for n in nodes if n not in self.partitions]
        if unknown:
            self.partitions.update({n: math.inf for n in unknown})  # asked once, answered or not
            asks = [Message(RecordDict(), dst_node_id=n, message_type=PARTITION_QUERY) for n in unknown]
            for reply in self.grid.send_and_receive(asks, timeout=self.timeout):
                node = reply.metadata.src_node_id
                try:
                    if node in unknown and not reply.has_error():
                        self.partitions[node] = int(reply.content["metrics"][PARTITION_KEY])
                except (KeyError, TypeError, ValueError):  # a malformed answer: the node stays unordered
                    pass
        return sorted(nodes, key=lambda n: (self.partitions[n], n))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

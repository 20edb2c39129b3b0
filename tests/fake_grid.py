"""A Flower Grid without a SuperLink, for the strategy and ServerApp tests: every node is a Python function.

``answer(message)`` plays the node the message is for and returns its reply, or None for a node that does
not answer within the timeout: like Flower's own Grid after a timeout, ``send_and_receive`` then returns
the replies it has. Replies queued in ``extra`` (e.g. a straggler's late reply to an earlier round) are
returned alongside the next call's, which Flower's Grid never does: the server must ignore them itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class FakeGrid(Grid):
    def __init__(self, nodes: Iterable[int], answer: Callable[[Message], Message | None] | None = None) -> None:
        self.nodes = list(nodes)
        self.answer = answer
        self.extra: list[Message] = []
        self.timeouts: list[float | None] = []  # the timeout of every send_and_receive call
        if TaskIdentity._run_id is None:  # what Flower's runtime sets before a ServerApp builds messages
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:  # what Flower's InMemoryGrid does: the id a reply refers to
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.push_messages(messages)
        self.timeouts.append(timeout)
        replies = [reply for reply in map(self.answer, messages) if reply is not None]
        replies, self.extra = replies + self.extra, []
        return replies

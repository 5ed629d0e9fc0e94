"""A Flower Grid in this process: each message travels in Flower's wire format to the node's
ClientApp and back. Subclasses say what a node answers (`answer`); the rest of the Grid
interface is what strategies and Flower's SecAgg+ workflow read."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

from flwr.app import Context, Message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid


def wire(message: Message) -> Message:
    """`message` as the other side receives it: serialized and parsed, a separate object."""
    return message_from_proto(message_to_proto(message))


class InProcessGrid(Grid):
    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts  # node id → the node's Context (its state lives across messages)

    def answer(self, message: Message) -> Message | None:
        """The node's reply to `message` (already on the node's side), or None: no reply."""
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = (self.answer(wire(m)) for m in messages)
        return [wire(r) for r in replies if r is not None]

    @property
    def run(self):
        return SimpleNamespace(run_id=1)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def set_run(self, run):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

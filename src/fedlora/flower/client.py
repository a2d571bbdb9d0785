"""fedlora's Flower ``ClientApp``.

It imports only Flower and :mod:`fedlora.flower.node`, so a ClientApp process that hands its
message to the node's model keeper (node config ``keep-model=true``) never imports torch; one
without a keeper imports :mod:`fedlora.flower.apps` and does the work itself. Both run
:func:`fedlora.flower.apps.node_handle`.
"""

from __future__ import annotations

import sys

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.errors import FedloraError
from fedlora.flower import node, trusts_server

client_app = ClientApp()


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return Message(_reply("query", msg, context), reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return Message(_reply("train", msg, context), reply_to=msg)


def _reply(kind: str, msg: Message, context: Context) -> RecordDict:
    """The node's reply; a failure goes upstream in full only to a server the node trusts
    (:func:`fedlora.flower.trusts_server`): otherwise the server learns what failed, and the
    node's own log (its stderr) the details, which may quote its files."""
    content = msg.content if msg.has_content() else RecordDict()
    try:
        if node.keeps_model(context.node_config):
            return node.relay(kind, content, context)
        from fedlora.flower import apps

        return apps.node_handle(kind, content, context)
    except Exception as exc:
        if trusts_server(context.node_config):
            raise
        print(f"fedlora: the {kind} message failed: {exc!r}", file=sys.stderr, flush=True)
        raise FedloraError(
            f"the node's {kind} failed ({type(exc).__name__}); the node's own log says why"
        ) from None

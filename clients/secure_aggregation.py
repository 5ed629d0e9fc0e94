"""The client's side of SecAgg+: Flower's `secaggplus_mod`, for the rounds the server runs
under it.

Flower's mod speaks the legacy FitIns/FitRes records. `secure_aggregation` hands it our train
function wrapped so that the function still reads and writes our own records: the model arrives
named, and the reply's update leaves only as the mod's masked vector, weighted by the released
user count. A reply that trains nothing (declined, refused) takes part with weight 0, so the
other clients' masks still cancel and its name and ledger entry still reach the server.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from common.messages import ARRAY_NAMES, ARRAYS, CONFIG, METRICS, WEIGHT


def secured(msg: Message) -> bool:
    """Whether `msg` is a step of SecAgg+. The mod checks each step follows the last, so a
    server cannot pass a plain round off as a secure one."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: SecAgg+ steps go through Flower's mod; every other message passes."""
    if msg.metadata.message_type != MessageType.TRAIN or not secured(msg):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: _fitres(call_next(_ours(m), c), m))


def _ours(msg: Message) -> Message:
    """Add our records (named arrays, config) to the legacy FitIns the mod passes on."""
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    names = json.loads(str(fitins.config[ARRAY_NAMES]))
    values = parameters_to_ndarrays(fitins.parameters)
    msg.content[ARRAYS] = ArrayRecord(
        OrderedDict((n, Array(v)) for n, v in zip(names, values, strict=True))
    )
    msg.content[CONFIG] = ConfigRecord(dict(fitins.config))
    return msg


def _fitres(reply: Message, request: Message) -> Message:
    """Our reply with the legacy FitRes records the mod masks. Without an update (declined,
    refused) the request's own arrays go in at weight 0, which adds nothing to the sum."""
    content = reply.content
    names = json.loads(str(request.content[CONFIG][ARRAY_NAMES]))
    arrays = content[ARRAYS] if ARRAYS in content else request.content[ARRAYS]
    trained = ARRAYS in content and METRICS in content
    weight = round(float(content[METRICS][WEIGHT])) if trained else 0
    parameters = ndarrays_to_parameters([arrays[n].numpy() for n in names])
    if ARRAYS in content:
        del content[ARRAYS]
    for key, record in fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), parameters, weight, {}), keep_input=False
    ).items():
        content[key] = record
    return reply

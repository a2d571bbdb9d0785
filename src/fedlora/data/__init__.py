"""Data: sources → examples → client partitions → token ids.

:func:`load_examples` reads a builtin source (data shipped in packages), a user file or a hub
data set into :class:`Example` records; :func:`partition` splits them across clients with
flwr-datasets partitioners and :func:`split_heldout` keeps some for evaluation; :func:`encode`
turns them into token ids with the loss on the response only.
"""

from __future__ import annotations

from fedlora.data.encode import Encoded, collate, encode, encode_prompt
from fedlora.data.examples import TASK_KINDS, Example, TaskKind
from fedlora.data.partition import SCHEMES, partition, split_heldout
from fedlora.data.sources import BUILTIN_SOURCES, FILE_FORMATS, load_examples

__all__ = [
    "BUILTIN_SOURCES",
    "FILE_FORMATS",
    "SCHEMES",
    "TASK_KINDS",
    "Encoded",
    "Example",
    "TaskKind",
    "collate",
    "encode",
    "encode_prompt",
    "load_examples",
    "partition",
    "split_heldout",
]

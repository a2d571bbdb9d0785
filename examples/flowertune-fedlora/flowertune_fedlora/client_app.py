"""flowertune-fedlora: a FlowerTune ClientApp that trains each node at its own LoRA rank.

Laid out as Flower's ``flowertune-llm`` example (Apache-2.0, Flower Labs GmbH): the node loads
its partition and the base model and trains. What fedlora adds is marked ``# fedlora``: an
answer to the strategy's ``query`` (who the node is, its rank) and two calls around the training,
:func:`fedlora.flower.client_side.receive` and :func:`fedlora.flower.client_side.reply`.

``train.trainer`` picks the trainer: ``fedlora`` (fedlora's own loop: the run equals fedlora's
engines on the same config and seed) or ``hf`` (transformers' ``Trainer``, standing for your own).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.config import RunConfig
from fedlora.data import Example
from fedlora.data.encode import IGNORE_INDEX, encode
from fedlora.devices import names_host
from fedlora.flower import client_side  # fedlora
from flowertune_fedlora.task import fedlora_config, get_model, load_data

os.environ["TOKENIZERS_PARALLELISM"] = "true"

app = ClientApp()


@app.query()  # fedlora: the strategy asks each node which client it is
def query(msg: Message, context: Context) -> Message:
    cfg = fedlora_config(context.run_config)
    trainset = load_data(cfg, context.node_config["partition-id"])
    return client_side.identity(msg, context, num_examples=len(trainset))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's adapter on its local data."""
    cfg = fedlora_config(context.run_config)
    trainset = load_data(cfg, context.node_config["partition-id"])
    loaded = get_model(cfg, client_side.quantization(context, cfg))  # fedlora: 4/8 bits or none

    local = client_side.receive(msg, context, loaded.model)  # fedlora: this round's adapter
    if context.run_config.get("train.trainer", "fedlora") == "hf":
        loss = train_with_trainer(local.model, loaded.tokenizer, trainset, cfg)
    else:
        loss = local.train(trainset, loaded.tokenizer)
    return client_side.reply(msg, local, num_examples=len(trainset), loss=loss)  # fedlora


def train_with_trainer(
    model: Any, tokenizer: Any, examples: Sequence[Example], cfg: RunConfig
) -> float:
    """Train ``model`` with transformers' ``Trainer`` (a stand-in for any trainer of your own):
    ``train.steps`` steps of ``train.batch_size`` examples at ``train.lr``; the mean loss."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    train = cfg.train
    rows = [
        {"input_ids": e.input_ids, "labels": e.labels}
        for e in encode(examples, tokenizer, cfg.model.max_length)
    ]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=train.steps,
            per_device_train_batch_size=train.batch_size,
            learning_rate=train.lr,
            lr_scheduler_type="constant",
            save_strategy="no",
            report_to=[],
            seed=cfg.seed,
            use_cpu=names_host(str(model.device)),
            disable_tqdm=True,
        )
        collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        return float(trainer.train().training_loss)

"""flowertune-fedlora: a FlowerTune ServerApp that runs a fedlora method as its strategy.

Laid out as Flower's ``flowertune-llm`` example (Apache-2.0, Flower Labs GmbH); where that app
builds ``FedAvg``, this one builds :class:`fedlora.flower.strategy.FedLoRA` for
``strategy.name`` (``flora``, ``flexlora``, ``hafl-freeze``, … any fedlora method), which lets
every node train at its own rank. The server evaluates the global model on its held-out set
(``dataset.heldout``) each round; at the end it writes the global adapter (a PEFT adapter folder)
and each round's metrics under ``save-path``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora.flower.strategy import FedLoRA  # fedlora
from flowertune_fedlora.task import fedlora_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of the fedlora method ``strategy.name``."""
    cfg = fedlora_config(context.run_config)
    given = str(context.run_config.get("save-path", ""))
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    save_path = Path(given) if given else Path("results") / stamp
    save_path.mkdir(parents=True, exist_ok=True)

    strategy = FedLoRA(cfg)  # fedlora: instead of FedAvg(...)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),  # the strategy starts from the base model
        num_rounds=cfg.rounds,
        train_config=ConfigRecord({"save_path": str(save_path)}),
        timeout=cfg.flower.round_timeout_s,
    )

    strategy.save_adapter(save_path / "adapter")
    rows = [record.to_json() for record in strategy.records]
    (save_path / "metrics.json").write_text(json.dumps(rows, indent=1))
    print(f"flowertune-fedlora: global adapter in {save_path / 'adapter'}")

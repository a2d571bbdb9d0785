"""flowertune-fedlora: a FlowerTune-style Flower app whose nodes train LoRA adapters of their own
ranks, aggregated by a fedlora method."""

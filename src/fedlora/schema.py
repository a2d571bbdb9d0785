"""The run configuration's schema: typed sections as dataclasses, one way from TOML (or
``--set`` overrides) to them, and the registry of each method's own option section.

Every key is a dataclass field with a default; an unknown key or a value of the wrong type is a
:class:`ConfigError` that names the key, the file and line where it can, and lists what is allowed.
This module is the bottom of the package's import graph beside :mod:`fedlora.errors`: the
methods register their option sections here (:func:`method_options`), and
:mod:`fedlora.config`, above the methods, loads a run's config and checks it across sections.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar, Union

from fedlora.errors import ConfigError

TaskKind: TypeAlias = Literal["instruction", "classification", "multiple-choice"]
"""What a data set asks of the model: ``instruction`` (generate the response), ``classification``
(one of a fixed set of labels) or ``multiple-choice`` (one of each example's own options)."""
TASK_KINDS: tuple[TaskKind, ...] = typing.get_args(TaskKind)

Mode: TypeAlias = Literal["federated", "centralized", "standalone"]
"""How a run trains: federated (``strategy`` aggregates the clients' adapters), or one of the
single-party reference points."""
SINGLE_PARTY: tuple[Mode, ...] = ("centralized", "standalone")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """``smollm2-135m`` (embedded), ``tiny-llama`` (tests), a local folder or a hub id."""
    device: str = "auto"
    dtype: str = "auto"
    """The compute dtype of the base model: ``auto`` (bfloat16 on CUDA and on CPUs with native
    bfloat16, float32 elsewhere), ``float32``, ``bfloat16`` or ``float16`` (refused on a CPU
    without native float16). LoRA factors, optimizer state and merged updates stay float32."""
    attention: str = "auto"
    """transformers' attention implementation: ``auto`` (eager on a CPU in bfloat16 or float16
    up to 512 tokens, where it is 2-3x faster than the fused kernel; ``sdpa`` elsewhere),
    ``sdpa`` or ``eager``."""
    targets: list[str] = field(default_factory=list)
    """LoRA target modules (last part of the module name); empty: PEFT's default for the model's
    type (``q_proj``, ``v_proj`` for Llama, Qwen2, Gemma and Mistral; ``c_attn`` for GPT-2;
    ``qkv_proj`` for Phi-3, which PEFT's table lacks)."""
    max_length: int = 128
    """Tokens per example after truncation (the response is kept)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (transformers' non-reentrant checkpointing): the same loss and gradients, about a third
    more compute, and activation memory of one layer instead of all (what lets 3B–8B models
    train 512+ tokens on one GPU; FlowerTune's ``model.gradient-checkpointing``)."""
    deterministic: bool = False
    """Deterministic CUDA kernels (PyTorch's deterministic algorithms, cuBLAS's fixed workspace,
    no cuDNN benchmarking), so that a resumed run is bitwise the uninterrupted one on a GPU as
    it is on the CPU. Costs speed on CUDA (slower scatter/index kernels and cuBLAS reductions;
    an operation without a deterministic kernel stops the run with PyTorch's error naming it);
    changes nothing on the CPU."""


@dataclass
class DataConfig:
    source: str = "chatterbot"
    """``mmlu``, ``chatterbot``, ``bbc-news``, a .jsonl/.csv/.parquet path, or ``hub:NAME``."""
    kind: TaskKind | None = None
    """``instruction``, ``classification`` or ``multiple-choice``; default: the source's own."""
    columns: dict[str, str] | None = None
    """For files: Example field → column, e.g. {prompt = "question", response = "answer"}."""
    limit: int | None = None
    """Use a seeded sample of this many examples (None: all)."""
    partition: str = "iid"
    """``iid``, ``dirichlet``, ``classes`` (k per client) or ``task`` (one category per client)."""
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    heldout: int = 64
    """Examples held out for evaluation (the test split); no client trains on them."""
    heldout_categories: int = 0
    """Whole categories no client trains on (0: none), chosen by the seed and scored as their
    own set, ``unseen_*`` metrics (up to ``heldout`` of their examples): FlexLoRA's evaluation on
    tasks no client has seen. With ``partition = "task"`` they are held-out clients."""
    validation: int = 0
    """Examples split off the training pool after the held-out ones, before partitioning (0:
    none); no client trains on them. Every evaluation scores them beside the test split as
    ``validation_*`` metrics (what a study's learning-rate tuning chooses by, ``[tune]``);
    ``eval.split = "validation"`` scores them alone, instead of the test split."""


@dataclass
class ClientsConfig:
    num_clients: int = 3
    ranks: list[int] | str = field(default_factory=lambda: [16, 8, 4])
    """An explicit list (one per client, or repeated cyclically), or a distribution: ``flora``,
    ``uniform``, ``heavy-tail-light``, ``heavy-tail-strong``, ``normal`` over ``rank_set``."""
    rank_set: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    weights: list[float] | None = None
    """Raw weight of each client (repeated cyclically, like ``ranks``), normalised over a
    round's clients; used with ``weighting = "custom"``."""
    alpha: float | None = None
    """LoRA α for every client; None: α = 2r (FLoRA's setting)."""
    fraction: float = 1.0
    """Fraction of clients sampled per round (at least one)."""
    min_clients: int = 1
    """A round aggregates only if at least this many sampled clients reply."""
    retries: int = 1
    """Times a round with too few replies is tried again with a fresh sample; then skipped."""
    quantization: list[str] = field(default_factory=list)
    """Each client's frozen base, repeated cyclically like ``ranks`` (empty: all ``none``):
    ``none``, ``8bit`` or ``4bit`` (bitsandbytes: LLM.int8 or NF4). The LoRA factors stay
    float32 and every strategy's math is unchanged; merged updates stay float32 outside the
    quantized weights (:class:`fedlora.precision.MergedBase`), and the server evaluates its
    full-precision model. Federated strategies; on Flower, a node's ``quantization``."""

    def quantization_of(self, index: int) -> str:
        """How client ``index`` holds its base."""
        return self.quantization[index % len(self.quantization)] if self.quantization else "none"

    def alpha_for(self, rank: int) -> float:
        """LoRA α of a client of rank ``rank``: :attr:`alpha`, or 2r (FLoRA's setting)."""
        return float(self.alpha) if self.alpha else 2.0 * rank


@dataclass
class TrainConfig:
    """Hyper-parameters of one client's local training (:func:`fedlora.train.train_local`)."""

    lr: float = 3e-4
    steps: int = 10
    """Optimizer steps per round; used unless ``epochs`` is set."""
    epochs: float | None = None
    """Passes over the client's data per round (overrides ``steps``)."""
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    fuse: bool = True
    """Train a round's clients together in-process, each its own adapter on one pass over the
    shared base (:func:`fedlora.train.train_fused`), where the method allows it
    (:attr:`fedlora.clients.ClientHook.fuses`); false: one client at a time (each client's
    result is the same to the compute dtype's rounding, not bitwise)."""
    fuse_tokens: int = 4096
    """The most tokens one fused pass carries (``batch_size × model.max_length`` per client):
    how many clients share a pass; the rest of a round trains in further groups. The device's
    memory may bound a pass further (:func:`fedlora.train.tokens_per_pass`: half the memory the
    model leaves free, over an estimate of the activations a token keeps)."""


@dataclass
class EvalConfig:
    batch_size: int = 16
    rouge_samples: int = 0
    max_new_tokens: int = 32
    every: int = 1
    """Evaluate every this many rounds (the last round always)."""
    split: str = "heldout"
    """What a run is scored on: ``heldout`` (the test split, ``data.heldout``) or ``validation``
    (``data.validation``; the test split is then never scored)."""
    benchmark: str | None = None
    """Also score the global model on a builtin source or data file other than ``data.source``
    (e.g. ``mmlu``, as FLoRA scores instruction tuning); its metrics are prefixed
    ``NAME_`` (``mmlu_accuracy``)."""
    benchmark_examples: int = 200
    """How many examples of ``benchmark``: one fixed sample (seed 0) for every run and seed."""


@dataclass
class FaultsConfig:
    """Client faults injected into the in-process simulation: the probability that a sampled
    client, in a round, does each (drawn from the run's seed, so runs repeat and resume)."""

    crash_before: float = 0.0
    """Fails before training: nothing trained, no reply."""
    crash_after: float = 0.0
    """Trains, then fails before its reply arrives."""
    timeout: float = 0.0
    """Trains, but its reply does not arrive before the round closes."""
    straggler: float = 0.0
    """Replies in time after only ``straggler_work`` of its local steps (partial work)."""
    straggler_work: float = 0.5


@dataclass
class ValidationConfig:
    """Checks on every client update before aggregation, beyond keys, shapes, rank, dtype and
    finite values (always checked)."""

    max_norm: float | None = None
    """Reject a module whose update ``‖B A‖_F`` exceeds this (None: no bound)."""
    max_examples: int | None = None
    """Reject a client that claims more examples than this (None: no bound)."""
    norm_ratio: float | None = 10.0
    """Reject a client whose ``‖B A‖_F / √r`` (per component) in some module is more than this
    many times the median of that module over the round's clients (None: off). Needs no tuning;
    it bites from 3 clients a round (with 2, the median is the mean of the two)."""
    weight_ratio: float | None = 10.0
    """Weigh no client that reported its own example count by more than this many times the
    median count of the clients the server knows (None: no cap). A client's count is fixed when
    it joins: the size of the partition the server gave it (never capped: the server made it),
    or its first report (a Flower node with data of its own)."""
    trim: float = 0.0
    """A robust rule for the strategies that average the clients' tensors (zeropad, fedit, ffa,
    fedsa, fedsvd, flexlora): at every entry, drop this fraction of the round's clients at each
    end and average the rest, unweighted (the coordinate-wise trimmed mean; 0.5: the median).
    0 (default): the method's own weighted mean. A method whose update is an exact sum or a
    per-component rule (FLoRA and the methods built on it, HAFL, …) refuses it."""


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (:mod:`fedlora.privacy`): each client clips its update
    to ``clip_norm`` and adds Gaussian noise of standard deviation ``noise_multiplier ×
    clip_norm`` before sending it. Off while ``clip_norm`` is 0."""

    clip_norm: float = 0.0
    """The L2 bound C on a client's update (all its trained factors, minus where they started)."""
    noise_multiplier: float = 0.0
    """σ: the noise's standard deviation is σ·C (0: clipping only, no privacy guarantee)."""
    delta: float = 1e-5
    """The δ at which ε is reported."""
    noise_seed: int | None = None
    """None (default): noise from the OS's entropy, unknown to the server. Set only for
    reproducible experiments: anyone who knows the seed can remove the noise."""


@dataclass
class FlowerConfig:
    """How the server side waits on Flower (``fedlora run --engine flower``)."""

    wait_nodes_s: float = 300.0
    """How long the server waits for ``clients.num_clients`` SuperNodes before round 1."""
    round_timeout_s: float = 3600.0
    """How long it waits for a round's replies; a node silent for longer counts as failed."""
    client_gpus: float | None = None
    """GPUs per ClientApp on Flower's simulation engine (``fedlora run --engine flower``
    without ``--superlink``), as Ray counts them: a fraction ≤ 1 shares one GPU (0.25: four
    clients train on it at a time), a whole number gives each client that many. None: ``1 /
    clients_per_gpu`` where the launching machine has CUDA and ``model.device`` is not the CPU,
    else 0 (Ray hides every GPU from a ClientApp given none, so it trains on the CPU). At most
    the machine's number of CUDA devices (checked when the simulation starts)."""
    clients_per_gpu: int = 1
    """How many ClientApps share one GPU when ``client_gpus`` is None (simulation engine)."""
    client_cpus: int | None = None
    """CPU cores per ClientApp on the simulation engine (a whole number: Flower 1.42's
    federation config takes an integer); Ray runs at most cores ÷ this many clients at a time.
    None: Flower's default 2, capped at the launching machine's cores."""


@dataclass
class RunConfig:
    mode: Mode = "federated"
    """``federated``: clients train, ``strategy`` aggregates. Or a single-party reference point:
    ``centralized`` (every client's data pooled, one LoRA) or ``standalone`` (every client alone,
    nothing aggregated; the mean of their scores is reported); ``strategy`` is then unused."""
    strategy: str = "flora"
    """An aggregation strategy (a name in :data:`fedlora.methods.REGISTRY`: flora, fedit, fedex,
    flexlora, …). Where a list names what to run (``fedlora compare --strategies``, a study's
    ``strategies``), ``centralized`` and ``standalone`` stand for the modes: ``strategy =
    "centralized"`` is read as ``mode = "centralized"``."""
    rounds: int = 2
    seed: int = 0
    weighting: str = "examples"
    """Client weights p_k: ``examples`` (data size), ``uniform``, or ``custom``
    (``clients.weights``)."""
    export_rank: int | None = None
    """Compress FLoRA's exported adapter to this rank (None: the exact rank)."""
    save_merged: bool = False
    """Also save the full model with the global update merged."""
    log: list[str] = field(default_factory=list)
    """Loggers of every per-round metric besides ``metrics.jsonl``: ``tensorboard`` (event
    files in ``RUN_DIR/tensorboard``; needs the package ``tensorboard``:
    ``pip install 'fedlora[tensorboard]'``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    methods: dict[str, Any] = field(
        default_factory=lambda: default_method_options(), metadata={"sections": True}
    )
    """Each method's own options by section (``[hetlora]``, ``[adalora]``): written at the top
    level of a config like the other sections, defined and checked beside their method
    (:func:`method_options`)."""

    def __post_init__(self) -> None:
        for mode in SINGLE_PARTY:  # ``strategy = "centralized"``: a list's shorthand
            if self.strategy == mode:
                if self.mode not in ("federated", mode):
                    raise ConfigError(
                        f"strategy = {mode!r} and mode = {self.mode!r} disagree; "
                        f"set mode = {mode!r} alone"
                    )
                self.mode, self.strategy = mode, RunConfig.strategy

    @property
    def label(self) -> str:
        """What the run is called in tables, folders and progress bars: its strategy, or the mode
        of a single-party run."""
        return self.strategy if self.mode == "federated" else self.mode

    def running(self, label: str) -> RunConfig:
        """This config running ``label``: a strategy (federated) or a single-party mode, as
        ``fedlora compare --strategies`` and a study's ``strategies`` name them."""
        return dataclasses.replace(self, mode="federated", strategy=label)


METHOD_OPTIONS: dict[str, type[Any]] = {}
"""Option sections owned by a method, by section name, registered beside the method."""


T = TypeVar("T")


def method_options(section: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: the dataclass ``cls`` is the ``[section]`` of the config. Its fields are
    typed and defaulted like every section's; its ``check()`` (if any) raises
    :class:`ConfigError` for values out of range."""

    def wrap(cls: type[T]) -> type[T]:
        if section in METHOD_OPTIONS or section in {f.name for f in dataclasses.fields(RunConfig)}:
            raise ValueError(f"config section {section!r} registered twice")
        METHOD_OPTIONS[section] = cls
        return cls

    return wrap


def default_method_options() -> dict[str, Any]:
    return {name: cls() for name, cls in METHOD_OPTIONS.items()}


def options_of(config: RunConfig, cls: type[T]) -> T:
    """The run's options of the section ``cls`` is registered as (its defaults if unset)."""
    for name, registered in METHOD_OPTIONS.items():
        if registered is cls:
            value = config.methods.get(name)
            return value if isinstance(value, cls) else cls()
    raise ValueError(f"{cls.__name__} is not registered with method_options")


def drop_none(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: drop_none(v) for k, v in raw.items() if v is not None}
    return raw


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # the message carries "(at line L, column C)"
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value``: the value is read as TOML (``3``, ``0.1``, ``[8,4]``, ``true``) or else
    taken as a plain string."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip(), value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[last] = value


def build(
    cls: type[Any], raw: Any, where: str, *, noun: str = "config key", scope: str | None = None
) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, checking keys and types recursively.

    ``where``: the keys' prefix (``clients.``); ``noun`` and ``scope`` word an unknown key's
    error (``unknown config key 'x'; allowed in SCOPE: …``; ``scope`` defaults to the prefix, or
    the top level). A field's ``metadata["expects"]`` words a value's type error instead of
    the type (``expected a path, or a list of paths``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a table of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("sections")}
    sections = [f.name for f in dataclasses.fields(cls) if f.metadata.get("sections")]
    owned: dict[str, Any] = {}
    if sections:
        owned = {k: raw[k] for k in raw if k in METHOD_OPTIONS}
        raw = {k: v for k, v in raw.items() if k not in owned}
    unknown = set(raw) - set(fields)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(
            f"unknown {noun} {where + name!r}; allowed in "
            f"{scope or where.rstrip('.') or 'the top level'}: "
            f"{', '.join(sorted([*fields, *(METHOD_OPTIONS if sections else ())]))}"
        )
    values: dict[str, Any] = {}
    for name in sections:
        values[name] = {
            section: build(option_cls, owned.get(section, {}), f"{section}.")
            for section, option_cls in METHOD_OPTIONS.items()
        }
    for name, value in raw.items():
        hint = hints[name]
        key = f"{where}{name}"
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            values[name] = build(hint, value, f"{key}.")
            continue
        expects = fields[name].metadata.get("expects")
        try:
            values[name] = coerce(value, hint, key)
        except ConfigError:
            if expects is None:
                raise
            raise ConfigError(f"{key}: expected {expects}, got {value!r}") from None
    return cls(**values)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (int, float, str, bool, a ``Literal``, list[...], dict[str, str],
    dict[str, Any] (a table, built by its owner), unions)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if len(options) == 1 and typing.get_origin(options[0]) is Literal and value is not None:
            return None if value == "none" else coerce(value, options[0], key)
        errors = []
        for option in typing.get_args(hint):
            try:
                return coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not a valid {_describe(hint)}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value in allowed:
            return value
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {', '.join(allowed)}")
    if hint is type(None):
        if value is None or value == "none":
            return None
        raise ConfigError(f"{key}: expected none, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_describe(item)}, got {value!r}")
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if typing.get_args(hint)[1] is Any and isinstance(value, dict):
            return dict(value)  # a table its owner builds itself
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{key}: expected a table of strings, got {value!r}")
        return dict(value)
    accepts = _SCALARS.get(hint)
    if accepts is not None and accepts(value):
        return float(value) if hint is float else value
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")


_SCALARS: dict[Any, Any] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "none"
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The resolved configuration as plain data (for ``config.json`` in the run folder), the
    methods' sections at the top level as in a config file."""
    out = dataclasses.asdict(config)
    out.update(out.pop("methods"))
    return out

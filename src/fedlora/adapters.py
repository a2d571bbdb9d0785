"""The PEFT boundary: the one module that imports peft.

Builds a LoRA of rank ``r_k`` on a base model, reads its state as core factors with the scaling
folded (``ΔW = B A``, :func:`fedlora.lora.fold_scaling`), loads a strategy's start factors into
it, and exports a standard PEFT adapter folder (merging into the base weights is
:class:`fedlora.precision.MergedBase`'s).
Module names are those of the base model (``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


class _HubKernelNotice(logging.Filter):
    """Drops bitsandbytes' import-time warning that it could not fetch its optional 4-bit CPU
    kernel from the hub (``kernels-community``) on a CPU with AVX512-BF16. bitsandbytes then
    uses its own kernel; without a network the line would open every command (``import peft``
    imports bitsandbytes wherever it is installed) whether a client is quantized or not. Its
    other warnings pass. Installed here, before this module imports PEFT, the one import that
    triggers it, rather than by importing the package."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HubKernelNotice())

from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraLayer
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

from fedlora.devices import HOST
from fedlora.errors import ConfigError
from fedlora.lora import ADAPTER, LoRAFactors, fold_scaling

__all__ = ["ADAPTER"]  # the adapter a client trains alone (defined where hooks can see it)

FROZEN = "frozen"
"""A second adapter holding components that are in the forward pass but never trained."""


EXTRA_TARGETS: dict[str, list[str]] = {"phi3": ["qkv_proj"]}
"""Default LoRA targets of model types PEFT's table does not list (Phi-3 fuses its query, key and
value projections into ``qkv_proj``, as Phi-3's own LoRA recipes target)."""


def resolve_targets(model: Any, targets: Sequence[str]) -> list[str]:
    """The LoRA target modules of ``model`` (last parts of module names): ``targets`` when given
    (``model.targets``), else PEFT's default for the model's type
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, e.g. ``q_proj, v_proj`` for Llama,
    ``c_attn`` for GPT-2), else :data:`EXTRA_TARGETS`."""
    if targets:
        return list(targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    kind: str = getattr(getattr(model, "config", None), "model_type", None) or ""
    found = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(kind) or EXTRA_TARGETS.get(kind)
    if not found:
        raise ConfigError(
            f"PEFT knows no default LoRA targets for model type {kind!r}: set model.targets to "
            f"some of its layers, named {sorted(_adaptable_names(model))}"
        )
    return list(found)


def _layer_shape(module: Any) -> tuple[int, int] | None:
    """``(d_out, d_in)`` of a layer PEFT's LoRA adapts through factors: a linear layer, or
    transformers' ``Conv1D`` (GPT-2; its weight is stored ``(d_in, d_out)``); None otherwise."""
    if isinstance(module, torch.nn.Linear):
        return (module.out_features, module.in_features)
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return (int(d_out), int(d_in))
    return None


def _stores_transposed(model: Any, names: Iterable[str]) -> bool:
    """Whether the layers ``names`` store their weights ``(d_in, d_out)`` (``Conv1D``): PEFT's
    ``fan_in_fan_out``, which it would otherwise set itself with a warning."""
    return any(isinstance(model.get_submodule(n), Conv1D) for n in names)


def _adaptable_names(model: Any) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _layer_shape(m) is not None}


def target_shapes(model: Any, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{name: (d_out, d_in)}`` of the linear (or ``Conv1D``) layers whose last name part is in
    ``targets`` (:func:`resolve_targets`: PEFT's default for the model when empty)."""
    targets = resolve_targets(model, targets)
    shapes = {}
    for name, module in model.named_modules():
        shape = _layer_shape(module)
        if name.rsplit(".", 1)[-1] in targets and shape is not None:
            shapes[name] = shape
    if not shapes:
        raise ConfigError(
            f"no linear layer named {list(targets)} in {type(model).__name__}; "
            f"its linear and Conv1D layers are named {sorted(_adaptable_names(model))}"
        )
    return shapes


def attach(
    model: Any,
    targets: Sequence[str],
    rank: int | Mapping[str, int],
    alpha: float | Mapping[str, float],
    seed: int,
    adapter: str = ADAPTER,
) -> Any:
    """Wrap ``model`` in a fresh PEFT LoRA named ``adapter`` (``A`` random from ``seed``, ``B``
    zero); a model that is already a PEFT model gets it beside its other adapters (fused
    training: :class:`RowAdapters`), initialised exactly as it would be alone.

    ``rank``/``alpha`` are one value or one per module name. The base weights are shared with
    ``model``, not copied; :func:`detach` gives the plain model back.
    """
    if isinstance(model, PeftModel):
        return _add_lora(model, rank, alpha, seed, adapter)
    ranks = _fitting_ranks(model, targets, rank)
    config = _lora_config(
        ranks, alpha, resolve_targets(model, targets), _stores_transposed(model, ranks)
    )
    # seeded init on the host (the same A on every machine; PEFT then moves it to the base
    # layer's device), the caller's RNG untouched
    with torch.random.fork_rng(devices=[]), HOST:
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, adapter_name=adapter)
    return peft_model


def _lora_config(
    ranks: Mapping[str, int],
    alpha: float | Mapping[str, float],
    targets: Any,
    transposed: bool,
) -> LoraConfig:
    alphas = {n: alpha[n] if isinstance(alpha, Mapping) else alpha for n in ranks}
    first = next(iter(ranks))
    return LoraConfig(
        r=ranks[first],
        lora_alpha=alphas[first],  # type: ignore[arg-type]  # PEFT takes float α
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        rank_pattern={n: r for n, r in ranks.items() if r != ranks[first]},
        alpha_pattern={n: a for n, a in alphas.items() if a != alphas[first]},
        fan_in_fan_out=transposed,
    )


def _add_lora(
    peft_model: Any,
    rank: int | Mapping[str, int],
    alpha: float | Mapping[str, float],
    seed: int,
    adapter: str,
) -> Any:
    """A fresh LoRA ``adapter`` beside the PEFT model's first, on the same modules; its ``A``
    drawn from ``seed`` in the same order as :func:`attach` draws it on a plain model."""
    if adapter in peft_model.peft_config:
        raise ConfigError(f"the model already has an adapter named {adapter!r}")
    first = next(iter(peft_model.peft_config))
    shapes = {
        name: (int(layer.out_features), int(layer.in_features))
        for name, layer in lora_layers(peft_model, first).items()
    }
    old = peft_model.peft_config[first]
    config = _lora_config(
        _ranks_that_fit(shapes, rank), alpha, old.target_modules, old.fan_in_fan_out
    )
    with torch.random.fork_rng(devices=[]), HOST:
        torch.manual_seed(seed)
        peft_model.add_adapter(adapter, config)
    return peft_model


class RowAdapters:
    """Each LoRA layer of a PEFT model applies to row ``i`` of its input the adapter
    ``names[i]`` only, in training too: fused training (:func:`fedlora.train.train_fused`),
    where several clients' adapters share one pass over the base.

    The rule is PEFT's mixed-adapter forward (``LoraLayer._mixed_batch_forward``): the base layer
    once for all rows, then each adapter, with its own dropout and scaling, on its rows only,
    added to those rows of the output. PEFT reaches it only in eval mode
    (``PeftModel.forward(adapter_names=…)`` refuses training mode) and gathers and scatters each
    adapter's rows by index (``x[indices]``, ``result[indices] += …``), a copy of the activations
    per adapter and layer. Fused training puts each client's rows together, so for PEFT's linear
    LoRA layers (``lora.Linear``, GPT-2's ``Conv1D`` included) this computes the same on each
    adapter's rows split from the input (views; the input cast to the adapters' dtype once),
    adding the concatenated outputs once in the adapters' dtype as PEFT's forward adds them, for
    as long as the ``with`` block lasts
    (the layer's ``forward`` is its own again afterwards); other LoRA layer types get PEFT's own
    path through the pre-forward hook PEFT registers. :attr:`names` is read at each call, so a
    layer recomputed under gradient checkpointing sees the rows of its own step. Every adapter
    named must be trainable (:func:`train_adapters`)."""

    def __init__(self, peft_model: Any) -> None:
        self.model = peft_model
        self._names: list[str] = []
        self._runs: list[str] = []
        """The adapter of each run of consecutive rows of one adapter, in order."""
        self._sizes: list[int] = []
        """How many tokens each run holds."""
        self._handles: list[Any] = []
        self._patched: list[Any] = []

    @property
    def names(self) -> list[str]:
        return self._names

    def assign(self, names: Sequence[str], width: int) -> None:
        """Row ``i`` of the next batches (each ``width`` tokens wide) is adapter ``names[i]``'s;
        each adapter's rows must be consecutive."""
        self._names = list(names)
        self._runs, self._sizes = [], []
        start = 0
        for i in range(1, len(names) + 1):
            if i == len(names) or names[i] != names[start]:
                self._runs.append(names[start])
                self._sizes.append((i - start) * width)
                start = i

    @property
    def slices_every_layer(self) -> bool:
        """Whether every LoRA layer takes its adapters' rows as slices (all are ``lora.Linear``),
        so that a row may carry several sequences (:func:`fedlora.data.encode.pack`); PEFT's
        own path for other layer types needs one adapter name per sequence."""
        return not self._handles

    def _inject(self, module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        kwargs["adapter_names"] = self._names
        return args, kwargs

    def _forward(self, layer: Any) -> Any:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result: torch.Tensor = layer.base_layer(x, *args, **kwargs)
            out = result.reshape(-1, result.shape[-1])
            present = [name for name in self._runs if name in layer.lora_A]
            if not present:
                return result
            # the input cast to the adapters' dtype once (PEFT casts it per adapter), then split
            # into each adapter's rows: views, and the backward of a split is one concatenation
            # of their gradients (a slice per adapter would add a zero-filled gradient of the
            # whole input per adapter and layer)
            tokens = x.reshape(-1, x.shape[-1]).to(layer.lora_A[present[0]].weight.dtype)
            parts = []
            for name, sub in zip(self._runs, torch.split(tokens, self._sizes), strict=True):
                if name not in layer.lora_A:  # no adapter here: nothing added to these rows
                    parts.append(sub.new_zeros(sub.shape[0], out.shape[-1]))
                    continue
                A, B = layer.lora_A[name], layer.lora_B[name]
                sub = layer.lora_dropout[name](sub.to(A.weight.dtype))
                parts.append(B(A(sub)) * layer.scaling[name])
            # as PEFT adds: in the adapters' dtype, then back to the base layer's; one add of the
            # concatenated outputs, whose backward hands each adapter its rows' gradient (an
            # in-place add per adapter would clone the whole output's gradient per adapter)
            return (out + torch.cat(parts, dim=0)).to(result.dtype).reshape(result.shape)

        return forward

    def __enter__(self) -> RowAdapters:
        layers: list[Any] = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        for layer in layers:
            if type(layer) is LoraLinear:
                layer.forward = self._forward(layer)  # type: ignore[method-assign]
                self._patched.append(layer)
            else:
                hook = layer.register_forward_pre_hook(self._inject, with_kwargs=True)
                self._handles.append(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in self._patched:
            del layer.forward
        self._handles.clear()
        self._patched.clear()


def trainable(peft_model: Any, adapter: str) -> list[torch.nn.Parameter]:
    """The parameters of ``adapter`` that train (``requires_grad``), in module order."""
    params = []
    for layer in lora_layers(peft_model, adapter).values():
        for factor in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
            if factor.requires_grad:
                params.append(factor)
    return params


def train_adapters(peft_model: Any, names: Sequence[str]) -> None:
    """Make the adapters ``names`` active and trainable, together (fused training)."""
    peft_model.base_model.set_adapter(list(names))


def _fitting_ranks(
    model: Any, targets: Sequence[str], rank: int | Mapping[str, int]
) -> dict[str, int]:
    """The rank of every target module, checked to fit it, on a model without LoRA layers."""
    if lora_layers_present(model):
        raise ConfigError("the model already has LoRA layers; detach() the previous adapter first")
    return _ranks_that_fit(target_shapes(model, targets), rank)


def _ranks_that_fit(
    shapes: Mapping[str, tuple[int, int]], rank: int | Mapping[str, int]
) -> dict[str, int]:
    """The rank of every module of ``shapes`` (one value or one per name), each checked to fit
    its module's shape."""
    ranks = {n: rank[n] if isinstance(rank, Mapping) else rank for n in shapes}
    for name, r in ranks.items():
        if r > min(shapes[name]):
            raise ConfigError(
                f"rank {r} is larger than module {name!r} allows (shape {shapes[name]})"
            )
    return ranks


def detach(peft_model: Any) -> Any:
    """Remove the LoRA layers (without merging) and return the plain base model, with gradient
    checkpointing off again (:func:`checkpoint_activations`)."""
    model = peft_model.unload()
    if _checkpointing(model):
        switch = getattr(model, "activation_checkpointing_disable", None)
        (switch or model.gradient_checkpointing_disable)()
        model.disable_input_require_grads()
    return model


def checkpoint_activations(peft_model: Any) -> None:
    """Turn on gradient checkpointing for one client's training (``model.gradient_checkpointing``),
    transformers' non-reentrant kind: it needs no gradient on the embeddings' output, so the
    input-gradient hook transformers adds with it is removed at once. It is on only between
    attach and :func:`detach`, so neither transformers nor PEFT (which adds the same hook when it
    wraps a checkpointing model) leaves one more hook on the embeddings each client and round."""
    model = peft_model.base_model.model
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()


def _checkpointing(model: Any) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def lora_layers(peft_model: Any, adapter: str = ADAPTER) -> dict[str, Any]:
    """``{base module name: LoRA layer}`` of a PEFT model that hold ``adapter``."""
    return {
        name: module
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def read_factors(peft_model: Any, adapter: str = ADAPTER) -> dict[str, LoRAFactors]:
    """The adapter's factors with the scaling folded into ``B`` (detached copies, float32).

    For an AdaLoRA layer (``ΔW = B (E ⊙ A) α / r``) the singular values ``E`` go into ``A`` and
    only the components AdaLoRA kept (``E ≠ 0``) are returned; a module whose every component was
    pruned returns one component with a zero ``A`` row (``ΔW = 0``; factors have rank ≥ 1).
    """
    factors = {}
    for name, layer in lora_layers(peft_model, adapter).items():
        if isinstance(layer, AdaLoraLayer):
            factors[name] = _read_adalora(layer, adapter)
            continue
        A = layer.lora_A[adapter].weight.detach().float().clone()
        B = layer.lora_B[adapter].weight.detach().float().clone()
        factors[name] = fold_scaling(A, B, float(layer.scaling[adapter]))
    return factors


def _read_adalora(layer: Any, adapter: str) -> LoRAFactors:
    E = layer.lora_E[adapter].detach().float()  # (r, 1)
    A = layer.lora_A[adapter].detach().float() * E
    B = layer.lora_B[adapter].detach().float()
    kept = (E[:, 0] != 0).nonzero()[:, 0]
    if kept.numel() == 0:
        kept = torch.zeros(1, dtype=torch.long, device=E.device)
    scaling = float(layer.scaling[adapter]) / (float(layer.ranknum[adapter]) + 1e-5)
    return fold_scaling(A[kept].contiguous(), B[:, kept].contiguous(), scaling)


def kept_ranks(peft_model: Any, adapter: str = ADAPTER) -> dict[str, int]:
    """Components per module that carry an update: AdaLoRA's unpruned ones (``E ≠ 0``), or the
    LoRA rank."""
    ranks = {}
    for name, layer in lora_layers(peft_model, adapter).items():
        if isinstance(layer, AdaLoraLayer):
            ranks[name] = int((layer.lora_E[adapter] != 0).sum())
        else:
            ranks[name] = int(layer.r[adapter])
    return ranks


def attach_adalora(
    model: Any,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    seed: int,
    total_steps: int,
    target_rank: int,
    options: Any,
) -> Any:
    """Wrap ``model`` in a fresh PEFT AdaLoRA of initial rank ``rank`` whose budget shrinks to an
    average of ``target_rank`` per module over ``total_steps`` optimizer steps; ``options`` is
    :class:`fedlora.methods.flora_adalora.AdaLoRAOptions` (schedule fractions, EMA betas,
    orthogonality weight).
    Call ``peft_model.base_model.update_and_allocate(step)`` after every optimizer step."""
    _fitting_ranks(model, targets, rank)
    tinit = int(options.tinit * total_steps)
    tfinal = max(1, int(options.tfinal * total_steps))
    if total_steps - tfinal <= tinit:
        raise ConfigError(
            f"AdaLoRA needs a budgeting phase: {total_steps} local steps leave none after "
            f"tinit={tinit} and tfinal={tfinal} steps; raise train.steps or lower "
            "adalora.tinit / adalora.tfinal"
        )
    config = AdaLoraConfig(
        init_r=rank,
        target_r=target_rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT takes float α
        target_modules=resolve_targets(model, targets),
        lora_dropout=0.0,
        total_step=total_steps,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=options.delta_t,
        beta1=options.beta1,
        beta2=options.beta2,
        orth_reg_weight=options.orth_reg,
    )
    with torch.random.fork_rng(devices=[]), HOST:  # as in attach()
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def tail_penalty(peft_model: Any, keep: Mapping[str, int]) -> Any:
    """HetLoRA's regulariser as a callable for a hook's ``Callbacks(penalty=...)``:
    ``Σ_modules ‖s B[:, keep:]‖_F ‖A[keep:]‖_F`` over the trainable adapter (scaling ``s``)."""
    layers = lora_layers(peft_model)

    def penalty() -> torch.Tensor:
        terms = []
        for name, layer in layers.items():
            k = keep[name]
            A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            s = float(layer.scaling[ADAPTER])
            terms.append(torch.linalg.norm(B[:, k:]) * s * torch.linalg.norm(A[k:]))
        return torch.stack(terms).sum()

    return penalty


def add_frozen(peft_model: Any, frozen: Mapping[str, LoRAFactors]) -> None:
    """Add ``frozen`` (factors per module, scaling 1) as a second adapter that is active in the
    forward pass but not trainable (HAFL's freezing mode): PEFT sums the outputs of all active
    adapters, so the model computes ``W x + (B A + B_f A_f) x`` while only ``B A`` has
    parameters with ``requires_grad``."""
    if not frozen:
        return
    ranks = {n: f.rank for n, f in frozen.items()}
    first = next(iter(ranks))
    config = LoraConfig(
        r=ranks[first],
        lora_alpha=ranks[first],
        target_modules=list(frozen),  # full module names: each matches itself only
        lora_dropout=0.0,
        bias="none",
        rank_pattern={n: r for n, r in ranks.items() if r != ranks[first]},
        alpha_pattern={n: r for n, r in ranks.items() if r != ranks[first]},
    )
    with torch.random.fork_rng(devices=[]), HOST:  # its init is overwritten; keep the caller's RNG
        peft_model.add_adapter(FROZEN, config)
    write_factors(peft_model, frozen, FROZEN)
    peft_model.base_model.set_adapter([ADAPTER, FROZEN])
    for layer in lora_layers(peft_model, FROZEN).values():
        for param in (layer.lora_A[FROZEN].weight, layer.lora_B[FROZEN].weight):
            param.requires_grad_(False)


def write_factors(
    peft_model: Any, start: Mapping[str, LoRAFactors], adapter: str = ADAPTER
) -> None:
    """Load ``start`` into the first ``r'`` components of each module (``B₀ = B / s``).

    Components beyond ``r'`` keep their fresh initialisation (``A`` random, ``B`` zero), so none
    is dead (a component with zero ``A`` row and zero ``B`` column gets no gradient).
    """
    layers = lora_layers(peft_model, adapter)
    for name, factors in start.items():
        if name not in layers:
            raise ConfigError(f"start factors for unknown module {name!r}")
        layer = layers[name]
        A0, B0 = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        r = factors.rank
        if r > A0.shape[0] or factors.shape != (B0.shape[0], A0.shape[1]):
            raise ConfigError(
                f"module {name!r}: start factors of rank {r} and shape {factors.shape} do not fit "
                f"the adapter of rank {A0.shape[0]} and shape {(B0.shape[0], A0.shape[1])}"
            )
        scaling = float(layer.scaling[adapter])
        with torch.no_grad():
            A0[:r].copy_(factors.A)
            B0[:, :r].copy_(factors.B / scaling)


def importance_tracker(peft_model: Any, beta1: float = 0.85, beta2: float = 0.85) -> Any:
    """A :class:`fedlora.importance.ComponentImportance` over every LoRA layer's ``A`` and ``B``;
    call its ``step()`` from a hook's ``Callbacks(on_step=...)``."""
    from fedlora.importance import ComponentImportance

    def getter(layer: Any) -> Any:
        return lambda: (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)

    params = {name: getter(layer) for name, layer in lora_layers(peft_model).items()}
    return ComponentImportance(params, beta1, beta2)


def freeze(peft_model: Any, part: str, adapter: str = ADAPTER) -> None:
    """Make every ``A`` (``part = "A"``, FFA-LoRA) or every ``B`` of ``adapter`` non-trainable:
    no gradient, no optimizer state."""
    if part not in ("A", "B"):
        raise ValueError(f"part must be 'A' or 'B', got {part!r}")
    for layer in lora_layers(peft_model, adapter).values():
        factor = layer.lora_A if part == "A" else layer.lora_B
        factor[adapter].weight.requires_grad_(False)


def export_adapter(
    model: Any,
    factors: Mapping[str, LoRAFactors],
    targets: Sequence[str],
    folder: Path,
    base_name: str | None = None,
) -> Path:
    """Save ``factors`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    Each module gets its own rank (``rank_pattern``) and ``α = r`` so the scaling is 1 and
    ``B₀ = B``. ``base_name``: the ``base_model_name_or_path`` it names (default: where
    ``model`` was loaded from). ``model`` is wrapped only for the save and given back unchanged.
    """
    peft_model = attach_factors(model, targets, factors)
    try:
        missing = set(lora_layers(peft_model)) - set(factors)
        if missing:
            raise ConfigError(f"no factors to export for modules {sorted(missing)}")
        if base_name is not None:
            peft_model.peft_config[ADAPTER].base_model_name_or_path = base_name
        # the vocabulary is never changed: no look-up of the base's config on the hub
        peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    finally:
        detach(peft_model)
    return folder


def attach_factors(model: Any, targets: Sequence[str], factors: Mapping[str, LoRAFactors]) -> Any:
    """Wrap ``model`` in a LoRA holding exactly ``factors``: each module at its own rank with
    ``α = r`` (scaling 1, so ``B₀ = B``). On a bad fit the model is given back unwrapped."""
    ranks = {n: f.rank for n, f in factors.items()}
    peft_model = attach(model, targets, ranks, {n: float(r) for n, r in ranks.items()}, seed=0)
    try:
        write_factors(peft_model, factors)
    except Exception:
        detach(peft_model)
        raise
    return peft_model


def load_adapter(model: Any, folder: Path) -> Any:
    """Load a saved PEFT adapter onto ``model`` (for checks and users)."""
    return PeftModel.from_pretrained(model, str(folder))


def lora_layers_present(model: Any) -> bool:
    """Whether any LoRA layer is still injected in ``model``."""
    return any(isinstance(m, LoraLayer) for m in model.modules())


def read_adapter(folder: Path) -> dict[str, LoRAFactors]:
    """The factors of a saved PEFT LoRA adapter folder, scaling folded (``ΔW = B A``), keyed by
    base-model module name. Reads only ``adapter_config.json`` and ``adapter_model.safetensors``
    (never a pickle); each module's rank and α follow PEFT's ``rank_pattern`` / ``alpha_pattern``
    matching, and rsLoRA's ``α/√r``.
    """
    from peft.utils.other import get_pattern_key
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    try:
        config = LoraConfig.from_pretrained(str(folder))
        tensors = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"{folder} is not a readable PEFT LoRA adapter: {exc}") from None
    # PEFT 0.22 types the patterns as optional (None when a config file leaves them out)
    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    factors: dict[str, LoRAFactors] = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key.removesuffix(".lora_A.weight")
        b_key = f"{prefix}.lora_B.weight"
        if b_key not in tensors:
            raise ConfigError(f"{weights}: {key} has no matching {b_key}")
        module = prefix.removeprefix("base_model.model.")
        r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config.r)
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.lora_alpha)
        A, B = tensors[key], tensors[b_key]
        if A.shape[0] != r or B.shape[1] != r:
            raise ConfigError(
                f"{weights}: module {module} has factors of rank {A.shape[0]} and {B.shape[1]}, "
                f"but adapter_config.json gives rank {r}"
            )
        scaling = alpha / r**0.5 if config.use_rslora else alpha / r
        factors[module] = fold_scaling(A, B, scaling)
    if not factors:
        raise ConfigError(f"{weights} holds no LoRA factors (no key ending in .lora_A.weight)")
    return factors

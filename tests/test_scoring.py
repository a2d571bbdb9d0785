"""The training loss in row blocks (``token_cross_entropy``) against torch's cross-entropy, and
the attention implementation ``model.attention`` resolves to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedlora import adapters, federation, scoring
from fedlora.config import load_config
from fedlora.data.encode import IGNORE_INDEX, Encoded, collate
from fedlora.errors import ConfigError
from fedlora.models import load_model
from fedlora.precision import EAGER_MAX_LENGTH, resolve_attention

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (4 * torch.randn(rows, vocab, generator=gen)).to(dtype)


def _targets(rows: int, vocab: int, ignored: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    mask = torch.ones(rows, dtype=torch.bool)
    mask[ignored] = False
    return targets.masked_fill(~mask, IGNORE_INDEX), mask


def _reference(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[mask].float(), targets[mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [3, 1000])
def test_the_blocked_loss_and_its_gradient_are_torch_s_cross_entropy(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, block_rows: int
) -> None:
    rows, vocab = 11, 257  # 3-row blocks: three full ones and a partial last one
    monkeypatch.setattr(scoring, "_BLOCK_ELEMENTS", block_rows * vocab)
    targets, mask = _targets(rows, vocab, ignored=[0, 4, 10])
    ours = _logits(rows, vocab, dtype).requires_grad_()
    ref = ours.detach().clone().requires_grad_()

    loss = scoring.token_cross_entropy(ours, targets, mask)
    expected = _reference(ref, targets, mask)
    (3.0 * loss).backward()
    (3.0 * expected).backward()

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert ours.grad is not None and ref.grad is not None
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, ref.grad)  # the dtype's own tolerance
    assert torch.equal(ours.grad[~mask], torch.zeros_like(ours.grad[~mask]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_segment_s_loss_and_gradient_are_bitwise_its_own(dtype: torch.dtype) -> None:
    rows, vocab, ends = 11, 257, [4, 5, 11]
    targets, mask = _targets(rows, vocab, ignored=[0, 6, 10])
    whole = _logits(rows, vocab, dtype).requires_grad_()
    weights = torch.tensor([1.0, 2.0, 3.0])

    losses = scoring.token_cross_entropies(whole, targets, mask, ends)
    (losses * weights).sum().backward()

    assert losses.shape == (3,) and whole.grad is not None
    for g, (a, b) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        alone = whole.detach()[a:b].clone().requires_grad_()
        loss = scoring.token_cross_entropy(alone, targets[a:b], mask[a:b])
        (weights[g] * loss).backward()
        assert torch.equal(losses[g].detach(), loss.detach()), g
        assert alone.grad is not None and torch.equal(whole.grad[a:b], alone.grad), g
    for bad in ([4, 11, 5], [4, 10], []):
        with pytest.raises(ValueError, match="segment ends"):
            scoring.token_cross_entropies(whole, targets, mask, bad)


def test_the_loss_is_the_mean_over_labelled_rows_only() -> None:
    rows, vocab = 5, 64
    targets, mask = _targets(rows, vocab, ignored=[1, 2, 3, 4])
    logits = _logits(rows, vocab, torch.float32)
    by_hand = torch.logsumexp(logits[0], dim=0) - logits[0, targets[0]]

    loss = scoring.token_cross_entropy(logits, targets, mask)

    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)


def test_the_training_loss_is_the_model_s_own_loss_with_the_same_gradients() -> None:
    fed = federation.build_federation(load_config(TINY, []))
    model = adapters.attach(fed.loaded.model, ["q_proj", "v_proj"], 4, 8.0, seed=0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would leave A's gradient zero
    data = [
        Encoded([5, 6, 7, 8, 9, 10], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9, 10]),
        Encoded([11, 12, 13], [IGNORE_INDEX, 12, 13]),
    ]
    batch = collate(data, pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]

    ours = scoring.mean_token_loss(model, batch)
    ours_grads = torch.autograd.grad(ours, params)
    theirs = model(**batch).loss
    theirs_grads = torch.autograd.grad(theirs, params)

    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    adapters.detach(model)


# --- the attention implementation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "dtype", "max_length", "expected"),
    [
        (CPU, torch.bfloat16, 128, "eager"),
        (CPU, torch.float16, EAGER_MAX_LENGTH, "eager"),
        (CPU, torch.bfloat16, EAGER_MAX_LENGTH + 1, "sdpa"),
        (CPU, torch.float32, 128, "sdpa"),
        (CUDA, torch.bfloat16, 128, "sdpa"),
    ],
)
def test_auto_attention_is_eager_only_for_short_low_precision_sequences_on_a_cpu(
    device: torch.device, dtype: torch.dtype, max_length: int, expected: str
) -> None:
    assert resolve_attention("auto", device, dtype, max_length) == expected


def test_an_explicit_attention_is_kept_and_an_unknown_one_refused_before_loading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert resolve_attention("sdpa", CPU, torch.bfloat16, 64) == "sdpa"
    assert resolve_attention("eager", CUDA, torch.float32, 4096) == "eager"

    def no_load(*_args: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(federation, "load_configured", no_load)
    with pytest.raises(ConfigError, match=r"unknown model.attention 'flash'; use one of auto"):
        federation.build_federation(load_config(TINY, ["model.attention=flash"]))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_model_loads_with_the_attention_asked_for(attention: str) -> None:
    loaded = load_model("tiny-llama", dtype="bfloat16", attention=attention)

    assert loaded.model.config._attn_implementation == attention


def test_eager_and_fused_attention_give_the_same_logits_on_padded_batches() -> None:
    data = [Encoded(list(range(5, 15)), [IGNORE_INDEX] * 4 + list(range(9, 15)))]
    data.append(Encoded([20, 21, 22], [IGNORE_INDEX, 21, 22]))
    batch = collate(data, pad_id=0)
    logits = {}
    for attention in ("eager", "sdpa"):
        model = load_model("tiny-llama", dtype="float32", attention=attention).model
        with torch.no_grad():
            logits[attention] = scoring.labelled_logits(model, batch)[0]

    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-5, atol=1e-5)

"""Pure helpers: pad / truncate keep ΔW; the factored SVD and norm match dense computations."""

from __future__ import annotations

import pytest
import torch

from conftest import random_factors, rel_err
from fedlora.linalg import factored_svd, pad, stack, truncate


def test_padding_keeps_delta_and_truncation_keeps_the_first_components() -> None:
    f = random_factors(6, 5, 3, torch.Generator().manual_seed(0))

    padded = pad(f, 7)
    first = truncate(f, 2)

    assert padded.rank == 7 and torch.equal(padded.delta(), f.delta())
    assert torch.equal(first.A, f.A[:2]) and torch.equal(first.B, f.B[:, :2])
    with pytest.raises(ValueError, match="cannot pad"):
        pad(f, 2)
    with pytest.raises(ValueError, match="cannot truncate"):
        truncate(f, 0)


def test_stack_is_the_weighted_sum() -> None:
    gen = torch.Generator().manual_seed(1)
    fs = [random_factors(8, 9, r, gen) for r in (1, 4, 2)]

    s = stack(fs, [0.5, 0.25, 0.25])

    assert s.rank == 7
    expected = 0.5 * fs[0].delta() + 0.25 * fs[1].delta() + 0.25 * fs[2].delta()
    assert rel_err(s.delta(), expected) < 1e-6


@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(50, 30, 6), (30, 50, 6), (8, 6, 10)])
def test_factored_svd_matches_dense(d_out: int, d_in: int, rank: int) -> None:
    f = random_factors(d_out, d_in, rank, torch.Generator().manual_seed(2))

    U, S, Vh = factored_svd(f)

    dense_S = torch.linalg.svdvals(f.delta().double())
    q = S.numel()
    assert q == min(rank, d_out, d_in)
    assert torch.allclose(S.double(), dense_S[:q], rtol=1e-5, atol=1e-6 * float(dense_S[0]))
    assert rel_err((U * S) @ Vh, f.delta()) < 1e-5
    assert torch.allclose(U.mT @ U, torch.eye(q), atol=1e-5)
    assert torch.allclose(Vh @ Vh.mT, torch.eye(q), atol=1e-5)


def test_factored_svd_of_rank_deficient_factors() -> None:
    f = random_factors(20, 16, 4, torch.Generator().manual_seed(3))
    f = stack([f, f], [0.5, 0.5])  # rank 8 factors of a rank-4 product

    U, S, Vh = factored_svd(f)

    assert float(S[4:].abs().max()) < 1e-5 * float(S[0])
    assert rel_err((U * S) @ Vh, f.delta()) < 1e-5


def test_padding_to_the_same_rank_is_the_identity_and_by_one_adds_one_zero_component() -> None:
    f = random_factors(5, 4, 2, torch.Generator().manual_seed(3))

    same, wider = pad(f, 2), pad(f, 3)

    assert same is f
    assert wider.rank == 3 and wider.A.shape == (3, 4) and wider.B.shape == (5, 3)
    assert not wider.A[2].any() and not wider.B[:, 2].any()
    assert torch.equal(wider.delta(), f.delta())
    with pytest.raises(ValueError, match="cannot pad rank 2 down to 1"):
        pad(f, 1)

"""Split examples across clients with flwr-datasets partitioners, and hold some out.

Schemes (``category`` is the label every non-IID scheme groups by):

- ``iid``: a seeded shuffle, then :class:`IidPartitioner`'s contiguous shards; client sizes
  differ by at most one.
- ``dirichlet``: :class:`DirichletPartitioner` (Yurochkin et al. 2019,
  https://arxiv.org/abs/1905.12022): for each category ``c`` the shares ``q_c ~ Dir(α 1_K)`` of
  its examples go to the ``K`` clients; small ``α`` → few categories per client.
- ``classes``: :class:`PathologicalPartitioner` (Li et al. 2021, https://arxiv.org/abs/2102.02079)
  with ``k = classes_per_client`` categories per client, the first one deterministic
  (client ``i`` takes category ``i mod C`` of the ``C`` sorted ones, so every category is used
  when ``K ≥ C``), the others drawn at random; each category is split evenly among its clients.
- ``task``: :class:`NaturalIdPartitioner` over ``category``: client ``i`` holds all examples of
  the ``i``-th category in sorted order, so ``num_clients`` must equal the number of
  categories (an error says how many there are). Round-robin assignment was rejected: it would
  give a client several tasks; ``classes`` with ``classes_per_client=1`` serves other counts.

Examples are never copied into the partitioner: it sees a :class:`datasets.Dataset` of
``(index, category)`` rows, and the indices it returns pick the examples.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import warnings
from collections.abc import Sequence
from typing import Any

from fedlora.data.examples import Example
from fedlora.errors import ConfigError

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "classes", "task")
DIRICHLET_MIN_SIZE = 10
"""flwr-datasets' default smallest client for ``dirichlet``, lowered on small data."""


def partition(
    examples: Sequence[Example],
    num_clients: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
) -> list[list[Example]]:
    """Split ``examples`` into ``num_clients`` disjoint, non-empty client lists by ``scheme``.

    The same inputs give the same output; ``seed`` drives every random choice (``task`` has
    none). ``iid`` and ``task`` use every example; ``dirichlet`` too; ``classes`` drops the
    categories no client draws (only possible when ``num_clients`` < the number of categories).

    ``dirichlet`` runs with ``self_balancing=True`` (as in the paper's code, a client that holds
    more than ``n / K`` examples takes no more categories, which keeps sizes comparable) and
    ``min_partition_size = max(1, min(10, ⌊n / 4K⌋))``: flwr-datasets' default of 10, lowered on
    small data so that its ten resampling attempts can succeed.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    n = len(examples)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n:
        raise ConfigError(f"{num_clients} clients but only {n} examples: each needs at least one")
    categories = sorted({e.category for e in examples})
    partitioner, order = _partitioner(
        scheme, n, num_clients, categories, alpha, classes_per_client, seed
    )
    indices = _run(partitioner, examples, order, num_clients, scheme)
    for client, idx in enumerate(indices):
        if not idx:
            raise ConfigError(
                f"client {client} would get no examples (scheme {scheme!r}, {n} examples, "
                f"{num_clients} clients, {len(categories)} categories); use fewer clients, "
                "a larger alpha or more data"
            )
    return [[examples[i] for i in idx] for idx in indices]


def _partitioner(
    scheme: str,
    n: int,
    num_clients: int,
    categories: list[str],
    alpha: float,
    classes_per_client: int,
    seed: int,
) -> tuple[Any, list[int]]:
    """The flwr-datasets partitioner for ``scheme`` and the example order it sees."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    order = list(range(n))
    if scheme == "iid":
        random.Random(seed).shuffle(order)  # IidPartitioner cuts contiguous shards
        return IidPartitioner(num_partitions=num_clients), order
    if scheme == "dirichlet":
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"dirichlet alpha must be a positive number, got {alpha}")
        min_size = max(1, min(DIRICHLET_MIN_SIZE, n // (4 * num_clients)))
        part = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="category",
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=True,
            seed=seed,
        )
        return part, order
    if scheme == "classes":
        if not 1 <= classes_per_client <= len(categories):
            raise ConfigError(
                f"classes_per_client must be between 1 and the number of categories "
                f"({len(categories)}), got {classes_per_client}"
            )
        part = PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="category",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
        return part, order
    if num_clients != len(categories):
        shown = ", ".join(map(repr, categories[:10])) + (", …" if len(categories) > 10 else "")
        raise ConfigError(
            f"scheme 'task' gives each client one category, and the data has "
            f"{len(categories)} ({shown}); set num_clients to {len(categories)}, or use scheme "
            "'classes' with classes_per_client=1"
        )
    return NaturalIdPartitioner(partition_by="category"), order


def _run(
    partitioner: Any,
    examples: Sequence[Example],
    order: list[int],
    num_clients: int,
    scheme: str,
) -> list[list[int]]:
    from datasets import Dataset

    rows = [{"index": i, "category": examples[i].category} for i in order]
    partitioner.dataset = Dataset.from_list(rows)
    try:
        # flwr-datasets warns on Dirichlet retries and unused classes (both checked here) and
        # NaturalIdPartitioner draws a tqdm bar on stderr: keep both out of the caller's output.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return [list(partitioner.load_partition(c)["index"]) for c in range(num_clients)]
    except ValueError as exc:
        raise ConfigError(
            f"cannot partition {len(examples)} examples into {num_clients} clients with "
            f"scheme {scheme!r}: {exc}"
        ) from exc


def split_heldout(
    examples: Sequence[Example], size: int | float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """``(train, heldout)``: a seeded random ``size`` examples (a count, or a fraction in (0, 1))
    held out; both lists keep the input order."""
    n = len(examples)
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise ConfigError(f"heldout size must be a count or a fraction, got {size!r}")
    if isinstance(size, float):
        if not 0.0 < size < 1.0:
            raise ConfigError(f"a heldout fraction must lie in (0, 1), got {size}")
        count = round(size * n)
    else:
        count = size
    if not 1 <= count < n:
        raise ConfigError(
            f"heldout size {size!r} of {n} examples gives {count} heldout examples; "
            "both the heldout and the training set need at least one"
        )
    held = set(random.Random(seed).sample(range(n), count))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]

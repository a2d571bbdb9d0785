"""Benchmark studies: a grid of runs (variants × strategies × seeds) described by a study file,
with the mean and spread over seeds, per-round curves, and which differences are decided. One
module per job: the study file (:mod:`.spec`), running it (:mod:`.run`), the statistics
(:mod:`.statistics`) and the report (:mod:`.report`).

A study file (TOML) names a base config and what varies::

    name = "quality"
    title = "FLoRA's Table 1 setting, scaled down"
    config = "../configs/default.toml"   # relative to the study file; optional
    set = ["rounds=2", "clients.num_clients=10"]
    gpu_set = ["train.steps=50"]          # added when a CUDA GPU is present
    seeds = [0, 1, 2]
    metrics = ["accuracy", "loss"]        # the first is the headline
    reference = "flora"                   # others are compared with it, seed by seed
    reference_variant = "het"             # or: each variant's strategies against this one's
    against_bytes = true                  # also NAME-bytes.png: metrics against cumulative bytes

    [[variant]]
    name = "heterogeneous"
    set = ["clients.ranks=flora"]
    strategies = ["flora", "zeropad"]

An optional ``[tune]`` section tunes each strategy's learning rate by one rule::

    [tune]
    lrs = [1e-4, 3e-4, 1e-3, 3e-3]   # the grid
    seed = 0                          # one seed (default: the first of ``seeds``)
    metric = "loss"                   # scored on the validation split (default: the headline)
    fixed = true                      # also keep the config's own lr (the fixed-lr table)
    only = false                      # true: run the grid, report it, stop (a tuning study)
    # results = "../benchmarks/results/T/T.json"   # instead of lrs: a tuning study's best lrs
    # variant = "uniform"             # tune on this variant alone; every variant takes its lrs

Every variant × strategy runs every lr of the grid on that seed, judged by the final metric on
the validation split (``validation_METRIC``: the study's ``set`` must give ``data.validation``,
which every run then scores beside the test split; the choice never reads the test split), and
its best lr then runs on every seed as the variant ``NAME-tuned``, beside the fixed-lr variant
``NAME``, with the same tables, differences and curves. A cell whose config equals one already
run in the study (a tuned lr that is the config's own; the tuned cell on the tuning seed, which
is its tuning run) is not run twice. A budget that does not fit one study splits in two: a
tuning study (``only = true``), and a seeds study whose ``results`` names the tuning study's
JSON, which also lists every tuning run's folder: a seeds cell equal to one reuses it.

Every run is ``fedlora run`` (:func:`fedlora.experiment.run_experiment`) in
``WORKDIR/VARIANT/STRATEGY/seed-S``; a run whose folder already holds a summary of the same
config is reused, so a stopped study continues where it stopped. The results go to
``OUT/NAME.json`` (with the git commit, every config and library versions), ``OUT/NAME.md`` and
``OUT/NAME.png``.

The decision rule: two strategies on the same seed share the partitions, ranks, client samples
and held-out set, so they are compared seed by seed, and a difference is **decided** when a
two-sided paired t-test over the seeds rejects "no difference" at 95 % (``p < 0.05`` with
``n − 1`` degrees of freedom: with 3 seeds the mean must exceed 4.30 standard errors, with 6
seeds 2.57); never with fewer than two seeds. The same rule for every comparison. (Until
2026-12-06 the tables marked "larger than the spread": every seed the same sign and the mean above
one standard deviation, a one-sided ``p`` of about 0.11 with 3 seeds; the JSON keeps that flag
as ``beyond_spread``.) The stricter "ranges disjoint" also holds when every seed of one beats
every seed of the other.
"""

from fedlora.bench.study.report import plot_study, study_markdown, write_study
from fedlora.bench.study.run import (
    SUMMARY_EXTRAS,
    Cell,
    StudyResult,
    adapter_update_norm,
    best_lr,
    run_study,
    tuning_from,
)
from fedlora.bench.study.spec import (
    TUNED_SUFFIX,
    Study,
    Tune,
    Variant,
    load_study,
    tuning_key,
    with_seeds,
)
from fedlora.bench.study.statistics import (
    DECISION_LEVEL,
    beyond_spread,
    differences_at_bytes,
    paired_test,
    ranges_disjoint,
    recheck_at_bytes,
    recheck_decisions,
    spread,
    statistics_of,
    value_within_bytes,
)

__all__ = [
    "DECISION_LEVEL",
    "SUMMARY_EXTRAS",
    "TUNED_SUFFIX",
    "Cell",
    "Study",
    "StudyResult",
    "Tune",
    "Variant",
    "adapter_update_norm",
    "best_lr",
    "beyond_spread",
    "differences_at_bytes",
    "load_study",
    "paired_test",
    "plot_study",
    "ranges_disjoint",
    "recheck_at_bytes",
    "recheck_decisions",
    "run_study",
    "spread",
    "statistics_of",
    "study_markdown",
    "tuning_from",
    "tuning_key",
    "value_within_bytes",
    "with_seeds",
    "write_study",
]

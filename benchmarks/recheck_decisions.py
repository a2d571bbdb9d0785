"""Recompute every committed study's seed-paired comparisons under the current decision rule
(:func:`fedlora.bench.study.paired_test`, a two-sided paired t-test at 95 %) from the values in
its JSON, and list those whose decision differs from the flag the study was rendered with
(``beyond_spread``, the rule before 2026-12-06). No run is repeated.

    python benchmarks/recheck_decisions.py [benchmarks/results]
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedlora.bench.study import recheck_decisions

if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    total, changed = recheck_decisions(folder)
    print(f"{total} comparisons; {len(changed)} decided differently under the paired t-test")
    print("| study | variant | metric | strategy − reference | p (two-sided) | seeds | decided |")
    print("|---|---|---|---|---|---|---|")
    for c in changed:
        p = "" if c["p"] is None else f"{c['p']:.3f}"
        print(
            f"| {c['study']} | {c['variant']} | {c['metric']} | {c['strategy']} "
            f"{c['mean']:+.4f} | {p} | {c['seeds']} | {'yes' if c['decided'] else 'no'} |"
        )

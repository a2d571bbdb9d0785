"""Recompute every committed study's seed-paired comparisons from the values in its JSON (no run
is repeated):

1. under the current decision rule (:func:`fedlora.bench.study.paired_test`, a two-sided paired
   t-test at 95 %), listing those whose decision differs from the flag the study was rendered
   with (``beyond_spread``, the rule before 2026-12-06);
2. at equal bytes (:func:`fedlora.bench.study.recheck_at_bytes`) wherever the two methods'
   traffic differs, beside the decision at the final round.

    python benchmarks/recheck_decisions.py [benchmarks/results]
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedlora.bench.study import recheck_at_bytes, recheck_decisions


def _rounds(rounds: list[int]) -> str:
    return str(rounds[0]) if len(set(rounds)) == 1 else f"{min(rounds)}–{max(rounds)}"


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
    rows = recheck_at_bytes(folder)
    print()
    print(f"{len(rows)} comparisons whose methods' traffic differs, at equal bytes")
    print(
        "| study | variant | metric | strategy − reference | at the final round | "
        "at equal bytes [min, max] | p | budget MB | rounds reached |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = "" if r["p"] is None else f"{r['p']:.3f}"
        end = "" if r["final_mean"] is None else f"{r['final_mean']:+.4f}"
        end = f"**{end}**" if r["final_decided"] else end
        now = f"{r['mean']:+.4f} [{r['min']:+.4f}, {r['max']:+.4f}]"
        now = f"**{now}**" if r["decided"] else now
        print(
            f"| {r['study']} | {r['variant']} | {r['metric']} | {r['strategy']} − "
            f"{r['reference']} | {end} | {now} | {p} | {r['budget_mb']:.3g} | "
            f"{_rounds(r['rounds'])} vs {_rounds(r['reference_rounds'])} |"
        )

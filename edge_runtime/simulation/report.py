"""Simulation results as JSON, a markdown table and plots."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime.simulation.federation import MethodResult


def results_json(scenario: str, devices: Sequence[str], pretrained: Sequence[float],
                 results: Sequence[MethodResult], config: dict[str, Any]) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "devices": list(devices),
        "config": config,
        "pretrained": {"test_perplexity": list(pretrained), "mean": sum(pretrained) / len(pretrained)},
        "methods": {r.method: dataclasses.asdict(r) | {"mean": r.mean} for r in results},
    }


def markdown_table(devices: Sequence[str], pretrained: Sequence[float], results: Sequence[MethodResult]) -> str:
    header = "| method | " + " | ".join(devices) + " | mean |"
    lines = [header, "|" + "---|" * (len(devices) + 2)]
    rows = [("pretrained", list(pretrained))] + [(r.method, r.test_perplexity) for r in results]
    best = min(sum(v) / len(v) for _, v in rows)
    for name, values in rows:
        mean = sum(values) / len(values)
        mean_text = f"**{mean:.2f}**" if mean == best else f"{mean:.2f}"
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {mean_text} |")
    return "\n".join(lines) + "\n"


def write_plots(directory: Path, results: Sequence[MethodResult]) -> list[Path]:
    """Perplexity vs round per method, and per-layer generalist routing share per device."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are a convenience; the JSON and table hold the numbers
        return []
    written = []
    curves = [r for r in results if r.curve]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in curves:
            ax.plot([c[0] for c in r.curve], [sum(c[1]) / len(c[1]) for c in r.curve], marker="o", label=r.method)
        ax.set(xlabel="round", ylabel="mean test perplexity", title="Perplexity vs round")
        ax.legend()
        fig.tight_layout()
        written.append(directory / "perplexity_vs_round.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    for r in results:
        if not any(len(s) for s in r.routing_share) or r.method in ("local", "fedavg", "centralized"):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for device, shares in zip(r.devices, r.routing_share, strict=True):
            ax.plot(range(len(shares)), shares, marker=".", label=device)
        ax.set(xlabel="layer", ylabel="generalist share of gate weight", ylim=(0, 1),
               title=f"{r.method}: routing to the generalist")
        ax.legend()
        fig.tight_layout()
        written.append(directory / f"routing_{r.method}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write_report(directory: Path, payload: dict[str, Any], table: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(payload, indent=2))
    (directory / "results.md").write_text(f"# Simulation: {payload['scenario']}\n\nTest perplexity per device.\n\n"
                                          + table)

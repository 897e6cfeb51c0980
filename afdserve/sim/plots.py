"""Figure for `afdserve plan --plot` (matplotlib, Agg, imported lazily)."""
from __future__ import annotations


def plot_pareto(frontier: dict, path: str, tpot_target: float | None = None) -> None:
    """Tokens/GPU/s against TPOT, one curve per deployment family (from `planner.pareto`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    for fam, points in sorted(frontier["families"].items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=fam)
    if tpot_target:
        ax.axvline(tpot_target, linestyle="--", color="grey", linewidth=1,
                   label=f"TPOT target {tpot_target:g} ms")
    ax.set_title(f"{frontier['model']} at {frontier['context']} context: best deployment "
                 "per family (simulated)")
    ax.set_xlabel("time per output token, TPOT (ms)")
    ax.set_ylabel("decode throughput (tokens / GPU / s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

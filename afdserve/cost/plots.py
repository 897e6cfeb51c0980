"""Figures for `afdserve cost compare --plot` (matplotlib, Agg, imported lazily)."""
from __future__ import annotations


def plot_compare(report: dict, path: str) -> None:
    """Two panels from `analysis.compare_report`:

    left: USD per 1M decoded tokens vs context, one line per model (best AFD pairing);
    right: attention arithmetic intensity vs context per model against each chip's roofline
    ridge (dashed): below a ridge the attention is memory bound on that chip.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = report["contexts"]
    fig, (ax_cost, ax_ai) = plt.subplots(1, 2, figsize=(13, 5.2))
    for name, m in report["models"].items():
        ax_cost.plot(contexts, m["best_afd_usd_per_mtok"], marker="o", label=name)
        ax_ai.plot(contexts, m["arithmetic_intensity"], marker="o", label=name)
    ax_cost.set_title("Decoding cost, best AFD pairing (attention chip + FFN chip)")
    ax_cost.set_xlabel("context length (tokens)")
    ax_cost.set_ylabel("USD per 1M decoded tokens")
    ax_cost.set_xscale("log", base=2)
    ax_cost.grid(True, alpha=0.3)
    ax_cost.legend(fontsize=8)

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (chip, ridge) in enumerate(report["ridges"].items()):
        ax_ai.axhline(ridge, linestyle="--", linewidth=1, color=colors[-1 - i % len(colors)],
                      alpha=0.7)
        ax_ai.annotate(f"{chip} ridge {ridge:.0f}", xy=(contexts[0], ridge), fontsize=7,
                       va="bottom")
    ax_ai.set_title("Attention arithmetic intensity vs chip rooflines (dashed)")
    ax_ai.set_xlabel("context length (tokens)")
    ax_ai.set_ylabel("attention FLOPs per KV byte (log)")
    ax_ai.set_xscale("log", base=2)
    ax_ai.set_yscale("log")
    ax_ai.grid(True, alpha=0.3, which="both")
    ax_ai.legend(fontsize=8, loc="best")
    fig.suptitle("Step-3 report cost model (8-bit weights and KV unless noted)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

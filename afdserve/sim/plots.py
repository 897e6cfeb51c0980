"""Figures for `afdserve plan --plot` and `afdserve simulate --timeline` (matplotlib, Agg,
imported lazily)."""
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


RESOURCE_ROWS = {"attn_gpu": "attention GPU", "a2f_link": "A->F link", "ffn_gpu": "FFN GPU",
                 "f2a_link": "F->A link", "gpu": "GPU", "nic": "NIC"}
SIM_STAGE = {"attention": "attention", "a2f": "a2f", "ffn": "ffn", "f2a": "f2a", "head": "head"}


def timeline_rows(sched) -> dict[str, list[tuple]]:
    """A simulated schedule (`simulator.schedule`) as `afdserve.afd.timeline.step_rows` rows:
    {resource: [(stage, layer, micro-batch, start ms, duration ms)]}."""
    rows: dict[str, list[tuple]] = {}
    order = list(RESOURCE_ROWS)
    for s in sorted(sched, key=lambda s: (order.index(s.resource) if s.resource in order else 99, s.start)):
        rows.setdefault(RESOURCE_ROWS.get(s.resource, s.resource), []).append(
            (SIM_STAGE[s.stage], s.layer, s.micro_batch, s.start * 1e3, (s.end - s.start) * 1e3))
    return rows


def plot_timeline(sched, path: str, title: str = "") -> None:
    """The simulator's predicted step drawn like a measured trace (`afdserve trace plot`)."""
    from afdserve.afd.timeline import plot_gantt
    plot_gantt(timeline_rows(sched), path, title)

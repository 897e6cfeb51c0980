"""PNG plots of a bench result (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_all(result: dict, out: Path) -> list[str]:
    plt = _plt()
    files = []
    decode = [r for r in result.get("decode", []) if "tokens_per_s" in r]
    if decode:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ctx in sorted({r["context"] for r in decode}):
            rows = sorted((r for r in decode if r["context"] == ctx), key=lambda r: r["batch"])
            b = [r["batch"] for r in rows]
            line, = axes[0].plot(b, [r["tokens_per_s"] for r in rows], "o-", label=f"afdserve ctx {ctx}")
            peer = [(r["batch"], r["peer"]["tokens_per_s"]) for r in rows if r.get("peer", {}).get("tokens_per_s")]
            if peer:
                axes[0].plot(*zip(*peer), "x--", color=line.get_color(), label=f"transformers ctx {ctx}")
            axes[1].plot(b, [100 * r["roofline"]["bandwidth_fraction"] for r in rows], "o-",
                         color=line.get_color(), label=f"bytes/s, ctx {ctx}")
            axes[1].plot(b, [100 * r["roofline"]["matmul_fraction"] for r in rows], "s:",
                         color=line.get_color(), label=f"FLOP/s, ctx {ctx}")
        axes[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s",
                    title="Decode throughput (small preset)")
        axes[1].set(xscale="log", xlabel="batch", ylabel="% of measured machine limit",
                    title="Roofline: achieved / measured")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(_save(fig, out / "decode.png", plt))
    attn = result.get("attention", {}).get("rows", [])
    if attn:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for d in dict.fromkeys(r["design"] for r in attn):
            rows = sorted((r for r in attn if r["design"] == d), key=lambda r: r["context"])
            c = [r["context"] for r in rows]
            line, = ax.plot(c, [1e3 * r["step_s"] for r in rows], "o-", label=f"{d} measured")
            ax.plot(c, [1e3 * r["predicted_s"] for r in rows], "--", color=line.get_color(),
                    label=f"{d} cost model")
        ax.set(xscale="log", yscale="log", xlabel="context", ylabel="ms per decode step (1 layer)",
               title=f"Attention designs, batch {attn[0]['batch']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(_save(fig, out / "attention.png", plt))
    afd = [r for r in result.get("afd", {}).get("rows", []) if "tokens_per_s" in r]
    if afd:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.bar([r["mode"] for r in afd], [r["tokens_per_s"] for r in afd])
        ax.set(ylabel="decode tokens/s", title="Colocated vs AFD")
        fig.tight_layout()
        files.append(_save(fig, out / "afd.png", plt))
    return files


def _save(fig, path: Path, plt) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)

"""Search deployments against a TPOT target (no torch).

Candidates: AFD xAyF (attention and FFN hardware chosen independently from the given chips,
instances of `gpus_per_instance`, 1-3 FFN instances, attention instances as needed) and
colocated EP widths, each with 2-4 micro-batches. For each, the largest batch that meets the
TPOT target and fits memory (`simulator.max_batch_for_tpot`). Ranked by tokens/GPU/s and by
USD per 1M tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from afdserve.cost.arch import ModelArch
from afdserve.cost.hardware import Hardware
from afdserve.sim.simulator import Deployment, Efficiency, SimPrecision, SimResult, \
    load_efficiency, max_batch_for_tpot

AFD_MICRO_BATCHES = (2, 3, 4)
COLOCATED_MICRO_BATCHES = (1, 2)
FFN_INSTANCES = (1, 2, 3, 4)
COLOCATED_EP = (8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class PlanQuery:
    arch: ModelArch
    hardware: tuple[Hardware, ...]
    context: int
    tpot_ms: float
    max_gpus: int = 256
    gpus_per_instance: int = 8
    attention_precision: str = "fp8"


def afd_candidates(q: PlanQuery) -> list[Deployment]:
    """Every xAyF shape within `max_gpus` over all (attention chip, FFN chip) pairs."""
    g, out = q.gpus_per_instance, []
    for a_hw in q.hardware:
        for f_hw in q.hardware:
            for y in FFN_INSTANCES:
                for x in range(1, q.max_gpus // g - y + 1):
                    for m in AFD_MICRO_BATCHES:
                        out.append(Deployment("afd", a_hw, f_hw, x, y, g, micro_batches=m))
    return out


def colocated_candidates(q: PlanQuery) -> list[Deployment]:
    return [Deployment("colocated", hw, hw, ep=ep, micro_batches=m)
            for hw in q.hardware for ep in COLOCATED_EP if ep <= q.max_gpus
            for m in COLOCATED_MICRO_BATCHES]


def evaluate(q: PlanQuery, deps: list[Deployment], eff: Efficiency,
             tpot_ms: float | None = None) -> list[SimResult]:
    prec = SimPrecision.for_attention(q.attention_precision)
    results = []
    for dep in deps:
        r = max_batch_for_tpot(q.arch, dep, q.context, tpot_ms or q.tpot_ms, prec, eff)
        if r is not None:
            results.append(r)
    return results


def plan(q: PlanQuery, eff: Efficiency | None = None, top: int = 20) -> dict:
    """Best deployments for `q`: {'by_throughput': [...], 'by_cost': [...]} (result dicts)."""
    if q.tpot_ms <= 0:
        raise ValueError(f"--tpot-ms must be positive, got {q.tpot_ms}")
    if q.max_gpus < 1:
        raise ValueError(f"--max-gpus must be >= 1, got {q.max_gpus}")
    eff = eff or load_efficiency("gpu")
    results = _best_per_shape(evaluate(q, afd_candidates(q) + colocated_candidates(q), eff))
    by_tps = sorted(results, key=lambda r: -r.tokens_per_gpu_s)
    by_cost = sorted(results, key=lambda r: r.usd_per_mtok)
    return {"model": q.arch.name, "context": q.context, "tpot_ms_target": q.tpot_ms,
            "hardware": [h.name for h in q.hardware], "max_gpus": q.max_gpus,
            "attention_precision": q.attention_precision, "candidates": len(results),
            "by_throughput": [r.to_dict() for r in by_tps[:top]],
            "by_cost": [r.to_dict() for r in by_cost[:top]]}


def _best_per_shape(results: list[SimResult]) -> list[SimResult]:
    """Keep the best micro-batch count per deployment shape."""
    best: dict[str, SimResult] = {}
    for r in results:
        if r.deployment not in best or r.tokens_per_gpu_s > best[r.deployment].tokens_per_gpu_s:
            best[r.deployment] = r
    return list(best.values())


def pareto(q: PlanQuery, tpots_ms: list[float], eff: Efficiency | None = None) -> dict:
    """Per deployment family (AFD attn/FFN chip pair, colocated chip): the best tokens/GPU/s at
    each TPOT target, the frontier the plot draws."""
    eff = eff or load_efficiency("gpu")
    deps = afd_candidates(q) + colocated_candidates(q)
    families: dict[str, list[tuple[float, float, str]]] = {}
    for t in tpots_ms:
        best: dict[str, SimResult] = {}
        for r in evaluate(q, deps, eff, tpot_ms=t):
            fam = _family(r)
            if fam not in best or r.tokens_per_gpu_s > best[fam].tokens_per_gpu_s:
                best[fam] = r
        for fam, r in best.items():
            families.setdefault(fam, []).append((r.tpot_ms, r.tokens_per_gpu_s, r.deployment))
    return {"model": q.arch.name, "context": q.context, "families": families}


def _family(r: SimResult) -> str:
    if r.kind == "colocated":
        return "colocated " + r.deployment.rsplit(" ", 1)[-1]
    hw = r.deployment.rsplit(" ", 1)[-1]
    if "+" in hw:
        a, f = hw.split("+")
        return f"AFD attention {a} / FFN {f}"
    return f"AFD {hw}"

"""AFD deployment simulator and planner (no torch).

`simulator`: one decode step of an xAyF or colocated deployment, stage by stage;
`planner`: search deployments against a TPOT target; `local`: the same model on this CPU.
"""
from afdserve.sim.simulator import Deployment, SimPrecision, SimResult, load_efficiency, \
    max_batch_for_tpot, simulate

__all__ = ["Deployment", "SimPrecision", "SimResult", "load_efficiency", "max_batch_for_tpot",
           "simulate"]

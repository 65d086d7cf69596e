"""PuLP across its versions: creating a variable, the CBC solver, reading the solve's status.

The planner's LP (engine.planning.planner) is written once against these three calls, so a PuLP
release that moves them (4.0 creates variables through the problem, returns a stats object from
solve and no longer bundles CBC) changes this file only.
"""
from __future__ import annotations

import warnings

import pulp


def lp_variable(prob: pulp.LpProblem, name: str, up: float | None = None):
    """A continuous variable >= 0 (<= `up` when given) of `prob`."""
    # PuLP >= 3.3 creates variables through the problem (the only way in 4.0); older ones directly.
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, lowBound=0, upBound=up)
    return pulp.LpVariable(name, lowBound=0, upBound=up)


def _solver():
    """CBC: the copy bundled with PuLP < 4, else a `cbc` on PATH (pip install pulp[cbc])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if hasattr(pulp, "PULP_CBC_CMD"):
            bundled = pulp.PULP_CBC_CMD(msg=False)
            if bundled.available():
                return bundled
    return pulp.COIN_CMD(msg=False)


def solved_to_optimum(prob: pulp.LpProblem) -> bool:
    """Solve `prob` with CBC; whether it found an optimum (not infeasible, unbounded or failed)."""
    result = prob.solve(_solver())
    status = getattr(result, "status", result)  # PuLP 4: LpSolveStats; before: an int code
    name = pulp.LpStatus.get(status, str(status)) if isinstance(status, int) else getattr(status, "name", status)
    return str(name).lower() == "optimal"

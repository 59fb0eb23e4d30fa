"""Walking a traced program: the equations of a jaxpr and of every jaxpr nested in it."""

from __future__ import annotations

from collections.abc import Iterator


def equations(jaxpr) -> Iterator:
    """Every equation of a (closed) jaxpr, depth first, with those of the jaxprs in its
    equations' parameters (jit, scan, cond, while bodies, pallas_call kernels; alone or in
    tuples)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from equations(sub)

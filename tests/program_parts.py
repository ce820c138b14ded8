"""Helpers the model tests share: the equations of a traced program, and a gradient tree as one vector."""

import jax
import numpy as np


def all_eqns(jaxpr):
  """Every equation of `jaxpr`, and of the jaxprs nested in its equations (jit, custom_jvp, custom_vjp, scan)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from all_eqns(sub)


def flat(tree) -> np.ndarray:
  """The leaves of `tree` (gradients, say) raveled into one vector, in tree order."""
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])

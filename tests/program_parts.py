"""Helpers the model tests share: the equations of a traced program, a gradient tree as one vector, and
the train step's classification loss with its gradients on a small padded batch (and two float32 models'
compared)."""

import jax
import numpy as np

from bert_jax import steps


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


def classification_loss_and_grads(module, params, deterministic: bool):
  """The train step's classification loss (`steps.classification_loss`) and its gradients, jitted, on 3
  sequences of 9 tokens padded after 9, 4 and 7 (vocabulary ids below 99)."""
  rng = np.random.default_rng(0)
  attention_mask = (np.arange(9)[None, :] < np.array([[9], [4], [7]])).astype(np.int32)
  batch = {"input_ids": rng.integers(1, 99, (3, 9)).astype(np.int32), "attention_mask": attention_mask,
           "token_type_ids": np.zeros((3, 9), np.int32), "labels": np.array([0, 1, 0], np.int32),
           "weights": np.ones((3,), np.float32)}
  loss = lambda p: steps.classification_loss(module, p, batch, jax.random.key(5), deterministic)[0]  # noqa: E731
  return jax.jit(jax.value_and_grad(loss))(params)


def assert_same_loss_and_grads(module, plain, params, deterministic: bool):
  """`module`'s classification loss and gradients (`classification_loss_and_grads`) against `plain`'s, both
  float32: a kernel's sums in another order agree to rounding."""
  value, grads = classification_loss_and_grads(module, params, deterministic)
  plain_value, plain_grads = classification_loss_and_grads(plain, params, deterministic)
  np.testing.assert_allclose(value, plain_value, rtol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(plain_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))

"""The two layouts of the encoder's layer parameters, and the map between them.

Owns: stacking `encoder/layer_{i}/...` into `encoder/layers/...` `[num_layers, ...]` (the layout of
`scan_layers` and `stack_layers`) and back, with logical axis names; the view `stack_layers` gives its
unrolled layers. Used by the model (`BertModel`), `bert_jax.hf` and `bert_jax.state`.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.models import axes


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def stack_layers(encoder_variables: dict) -> dict:
  """An encoder's `layer_{i}/...` variables stacked into `layers/...` `[num_layers, ...]`: the layout of
  `nn.scan` (`scan_layers`). Boxed variables (logical axis names) gain `axes.LAYERS` first; the
  encoder's other entries pass as they are."""
  names = [k for k in encoder_variables if re.fullmatch(r"layer_\d+", k)]
  if not names:
    return encoder_variables
  if sorted(names) != sorted(f"layer_{i}" for i in range(len(names))):
    raise ValueError(f"Encoder layers {sorted(names)} are not numbered 0..{len(names) - 1}.")

  def stack(*leaves):
    if _is_box(leaves[0]):
      stacked = jnp.stack([leaf.unbox() for leaf in leaves])
      return leaves[0].replace_boxed(stacked).add_axis(0, {nn.PARTITION_NAME: axes.LAYERS})
    return jnp.stack(leaves)

  out = {k: v for k, v in encoder_variables.items() if k not in names}
  out["layers"] = jax.tree.map(stack, *(encoder_variables[f"layer_{i}"] for i in range(len(names))), is_leaf=_is_box)
  return out


def unstack_layers(encoder_variables: dict) -> dict:
  """The inverse of `stack_layers`: `layers/...` `[num_layers, ...]` as `layer_{i}/...`."""
  if "layers" not in encoder_variables:
    return encoder_variables
  leaves, treedef = jax.tree.flatten(encoder_variables["layers"], is_leaf=_is_box)

  def unstack(leaf):
    if _is_box(leaf):
      return [leaf.replace_boxed(x).remove_axis(0, {nn.PARTITION_NAME: axes.LAYERS}) for x in unstack(leaf.unbox())]
    # jax.lax.unstack, whose gradient is one stack (a concatenate) per parameter; host arrays stay on the host.
    return list(leaf) if isinstance(leaf, np.ndarray) else jax.lax.unstack(leaf)

  columns = [unstack(leaf) for leaf in leaves]
  out = {k: v for k, v in encoder_variables.items() if k != "layers"}
  out.update({f"layer_{i}": jax.tree.unflatten(treedef, [column[i] for column in columns])
              for i in range(len(columns[0]) if columns else 0)})
  return out


def checked_view(collections: dict, num_layers: int) -> dict:
  """`nn.map_variables`' view (`{collection: variables}`) of an encoder stored stacked: its layers one
  by one, once the stored variables are checked to be stacked `num_layers` deep (`stack_layers=True`)."""
  for variables in collections.values():
    if not variables:
      continue
    if "layers" not in variables:
      raise ValueError(f"BertConfig.stack_layers=True takes the encoder's parameters stacked under "
                       f"encoder/layers; these are stored per layer ({sorted(variables)[:3]}...). Stack them "
                       "with bert_jax.hf.stack_layers(params), or set stack_layers=False.")
    depth = jax.tree.leaves(variables["layers"])[0].shape[0]
    if depth != num_layers:
      raise ValueError(f"The stacked encoder parameters hold {depth} layers; BertConfig.num_hidden_layers is "
                       f"{num_layers}. Use the checkpoint's config, or parameters of this depth.")
  return {name: unstack_layers(variables) for name, variables in collections.items()}


def stored(collections: dict) -> dict:
  """The inverse of `checked_view`: `{collection: the encoder's variables, stacked}`."""
  return {name: stack_layers(variables) for name, variables in collections.items()}

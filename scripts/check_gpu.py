"""GPU numerics: each speed switch against the plain float32 einsum path, on the GPU itself.

The unit suite checks 'dot_product' attention and bf16 on the CPU; cuDNN's fused attention exists
only on a GPU, so this script is its test. Run on a GPU machine from the repo root:
  python -m scripts.check_gpu
It prints one line per variant and exits 1 if any is outside its stated tolerance. First it checks
that the dropout's hashed masks (`bert_jax.models.dropout`) are XLA:CPU's bit for bit on the GPU;
after the variants, that the Pallas attention's in-kernel dropout draws the same mask there and
computes what float32 einsums with that mask compute.

Inputs: a 2-layer model (hidden 256, 4 heads of 64, as cuDNN needs head_dim a multiple of 8),
batch 8 of 128 tokens, each row padded after a random length in [16, 128]. Reference: einsum
attention in float32 with 'highest' matmul precision (no TF32). Compared: the classification loss
(summed cross-entropy), every parameter's gradient (relative L2 over all of them), and the
encoder output at real positions (relative L2), in deterministic mode (no dropout masks to match).
The parameters are the initialiser's with every bias drawn non-zero (the kernels add some themselves).
The tanh GELU variant (`hidden_act=gelu_new`, its forward in cuBLASLt's epilogue) is compared with
the float32 einsum path of that model; `ffn=mosaic*`, the feed-forward's Hopper kernels
(`feed_forward_impl`), with the plain one; the stacked variants (`stack_layers`) take the same parameters
stacked, their gradients compared unstacked.
Tolerances: float32 variants 1e-4 (TF32 off, only summation order differs); bfloat16 variants
2e-2 on the loss and 5e-2 on gradients and outputs, the bounds of tests/test_models.py's bf16 test
(bf16 keeps 8 significant bits, 0.4% relative rounding per op).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import hf
from bert_jax import models
from bert_jax import partitioning
from bert_jax import steps
from bert_jax.models import dropout
from bert_jax.models import flash_attention
from bert_jax.models import hopper_matmul
from configs import common

jax.config.update("jax_default_matmul_precision", "highest")

BATCH, SEQ = 8, 128
TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 5e-2)}  # (loss rel, gradient/output rel L2)


def _inputs(config: models.BertConfig):
  rng = np.random.default_rng(0)
  lengths = rng.integers(16, SEQ + 1, BATCH)
  lengths[0] = SEQ  # one full row
  attention_mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)  # [batch, seq]
  input_ids = np.where(attention_mask, rng.integers(1000, config.vocab_size, (BATCH, SEQ)), 0).astype(np.int32)
  token_type_ids = (np.arange(SEQ)[None, :] >= lengths[:, None] // 2).astype(np.int32) * attention_mask
  labels = rng.integers(0, 2, BATCH).astype(np.int32)
  return input_ids, attention_mask, token_type_ids, labels


def _loss_and_grads(config: models.BertConfig, params, inputs, dropout_key=None):
  """The train step's summed classification loss (`steps.classification_loss`) and its gradients;
  with `dropout_key`, with dropout on."""
  input_ids, attention_mask, token_type_ids, labels = inputs
  classifier = models.BertForSequenceClassification(config)
  batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
           "labels": labels, "weights": np.ones(labels.shape, np.float32)}

  def loss(p):
    return steps.classification_loss(classifier, p, batch, dropout_key, deterministic=dropout_key is None)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


def _sequence_output(config: models.BertConfig, params, inputs) -> jax.Array:
  """The encoder's output `[batch, seq, hidden]`, deterministic."""
  input_ids, attention_mask, token_type_ids, _ = inputs
  encoder = models.BertModel(config)
  return jax.jit(lambda p: encoder.apply({"params": p["bert"]}, input_ids, attention_mask, token_type_ids,
                                         deterministic=True).sequence_output)(params)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in jax.tree_util.tree_leaves(tree)])


def _rel_l2(actual, expected) -> float:
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _check_dropout_bits() -> int:
  """Failures (0 or 1): the dropout's hashed mask (`dropout.keep_mask`) on this device against the same
  function run by XLA:CPU, bit for bit, at the shape of a BERT-base hidden dropout at batch 256 x 128
  (25M elements)."""
  shape, rate = (256, 128, 768), 0.1
  words = jax.random.randint(jax.random.key(7), (256, 2), -2**31, 2**31 - 1, jnp.int32)
  mask = jax.jit(lambda w: dropout.keep_mask(w, shape, rate))
  ours = mask(words)
  on_cpu = mask(jax.device_put(words, jax.devices("cpu")[0]))  # runs where its input is
  mismatches = int(np.sum(np.asarray(ours) != np.asarray(on_cpu)))
  print(f"dropout mask {shape} on {ours.devices()} against XLA:CPU's: {mismatches} of {ours.size} differ "
        f"{'ok' if not mismatches else 'FAIL'}")
  return int(mismatches > 0)


def _check_flash_attention_dropout() -> int:
  """Failures (0 to 2): the Pallas attention's in-kernel dropout on this device. (1) Its mask, bit for bit:
  with q = k = 0 every real key gets probability 1/n, and with v one-hot per key position the output
  `[q, k]` is nonzero exactly where the kernel kept (q, k); against `dropout.keep_mask` (XLA's). (2) bf16
  values and gradients at 8 x 128 x 4 heads x 64, rate 0.1, against float32 einsums with that mask,
  relative L2 to 5e-2 (the bf16 bounds above)."""
  failures = 0
  batch, seq, heads, rate = 2, 128, 2, 0.1
  words = jax.random.randint(jax.random.key(5), (batch, heads, 2), -2**31, 2**31 - 1, jnp.int32)
  key_valid = jnp.arange(seq)[None, :] < jnp.array([[seq], [77]])
  zeros = jnp.zeros((batch, seq, heads, seq), jnp.float32)
  one_hot = jnp.broadcast_to(jnp.eye(seq, dtype=jnp.float32)[None, :, None, :], zeros.shape)
  out = jax.jit(lambda *a: flash_attention.flash_attention(*a, dropout_rate=rate))(zeros, zeros, one_hot, key_valid,
                                                                                    words)
  kernel_keep = jnp.swapaxes(out, 1, 2) > 0  # [batch, heads, q, k]
  want = dropout.keep_mask(words, (batch, heads, seq, seq), rate) & key_valid[:, None, None, :]
  mismatches = int(jnp.sum(kernel_keep != want))
  failures += mismatches > 0
  print(f"pallas attention dropout mask {want.shape}: {mismatches} of {want.size} differ from dropout.keep_mask "
        f"{'ok' if not mismatches else 'FAIL'}")

  batch, heads, head_dim = 8, 4, 64
  keys = jax.random.split(jax.random.key(6), 5)
  q, k, v, d_out = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.float32) for key in keys[:4])
  words = jax.random.randint(keys[4], (batch, heads, 2), -2**31, 2**31 - 1, jnp.int32)
  key_valid = jnp.arange(seq)[None, :] < jnp.arange(seq, 0, -seq // batch)[:, None]
  keep = dropout.keep_mask(words, (batch, heads, seq, seq), rate)

  def reference(q, k, v):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    probs = jax.nn.softmax(jnp.where(key_valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, probs / (1 - rate), 0.0), v)

  def kernel(q, k, v):
    return flash_attention.flash_attention(q, k, v, key_valid, words, dropout_rate=rate)

  def values_and_grads(fn, dtype):
    return jax.jit(lambda *qkv: jax.vjp(fn, *qkv))(*(t.astype(dtype) for t in (q, k, v)))

  want, want_vjp = values_and_grads(reference, jnp.float32)
  got, got_vjp = values_and_grads(kernel, jnp.bfloat16)
  rels = [_rel_l2(np.asarray(got, np.float32), np.asarray(want))]
  rels += [_rel_l2(np.asarray(g, np.float32), np.asarray(w)) for g, w in
           zip(got_vjp(d_out.astype(jnp.bfloat16)), want_vjp(d_out))]
  ok = max(rels) <= 5e-2 and all(np.isfinite(rels))
  failures += not ok
  print(f"pallas attention dropout {rate}, bfloat16 vs float32 einsums with its mask: output, dq, dk, dv rel L2 "
        + ", ".join(f"{r:.2e}" for r in rels) + f" (tol 5e-2) {'ok' if ok else 'FAIL'}")
  return failures


def _check_add_norm_dropout(base: models.BertConfig, params, inputs) -> int:
  """Failures (0 or 1): the Pallas add & norm against XLA's with hidden dropout 0.1 on (the same keep
  masks), float32, loss and gradients to 1e-4 relative."""
  results = {}
  for impl in ("xla", "pallas"):
    config = base.replace(attention_impl="dot_product", hidden_dropout_prob=0.1, layer_norm_impl=impl)
    loss, grads = _loss_and_grads(config, params, inputs, dropout_key=jax.random.key(3))
    results[impl] = float(loss), _flat(grads)
  loss_rel = abs(results["pallas"][0] - results["xla"][0]) / abs(results["xla"][0])
  grad_rel = _rel_l2(results["pallas"][1], results["xla"][1])
  ok = loss_rel <= 1e-4 and grad_rel <= 1e-4
  print(f"add & norm with hidden dropout 0.1, pallas vs xla, float32: loss rel {loss_rel:.2e}, gradients rel L2 "
        f"{grad_rel:.2e} (tol 1e-4) {'ok' if ok else 'FAIL'}")
  return int(not ok)


def _with_random_biases(params):
  """`params` with every bias (initialised at zero) drawn from N(0, 0.02^2): the Pallas attention adds the
  query's, key's and value's in its kernels, and the add & norm kernel the projections'."""
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  is_bias = lambda path: jax.tree_util.keystr(path).endswith("['bias']")  # noqa: E731
  return jax.tree_util.tree_unflatten(treedef, [
      x + 0.02 * jax.random.normal(jax.random.key(i), x.shape, x.dtype) if is_bias(path) else x
      for i, (path, x) in enumerate(paths_and_leaves)])


def main() -> int:
  partitioning.add_xla_flags(common.XLA_FLAGS)  # the numerics training runs with (cuBLAS, not Triton, GEMMs)
  print(f"devices: {jax.devices()}")
  failures = _check_dropout_bits()
  base = models.BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=1024, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  inputs = _inputs(base)
  params = _with_random_biases(hf.init_params(models.BertForSequenceClassification(base)))
  real = inputs[1].astype(bool)  # [batch, seq]: compare the encoder output at real tokens only
  references = {}  # hidden_act -> the float32 einsum path's loss, flat gradients, output at real tokens
  for hidden_act in ("gelu", "gelu_new"):
    config = base.replace(hidden_act=hidden_act)
    (ref_loss, ref_grads), ref_out = _loss_and_grads(config, params, inputs), _sequence_output(config, params, inputs)
    references[hidden_act] = ref_loss, _flat(ref_grads), np.asarray(ref_out, np.float32)[real]
  # Pallas attention in bf16 only: in float32 Triton's dots take TF32. Pruned: the classifier's last
  # layer computes [CLS] only (its attention by the einsums or dot_product); the encoder output compared
  # is BertModel's without output_positions, every row. gelu_new: the tanh GELU, whose forward XLA runs
  # in the matmul's cuBLASLt epilogue, against its own float32 reference. Stacked: the layers'
  # parameters stacked (stack_layers), given the same values and compared unstacked. mosaic*: the
  # feed-forward's GELU in our Hopper matmul kernels, either schedule (bf16 only; on a Hopper GPU only).
  variants = [dict(zip(("attention_impl", "dtype", "layer_norm_impl", "prune_last_layer", "hidden_act",
                        "stack_layers", "feed_forward_impl"), values)) for values in (
      ("dot_product", "float32", "xla", False, "gelu", False, "xla"),
      ("einsum", "bfloat16", "xla", False, "gelu", False, "xla"),
      ("dot_product", "bfloat16", "xla", False, "gelu", False, "xla"),
      ("cudnn", "bfloat16", "xla", False, "gelu", False, "xla"),
      ("dot_product", "float32", "pallas", False, "gelu", False, "xla"),
      ("cudnn", "bfloat16", "pallas", False, "gelu", False, "xla"),
      ("pallas", "bfloat16", "pallas", False, "gelu", False, "xla"),
      ("dot_product", "float32", "pallas", True, "gelu", False, "xla"),
      ("cudnn", "bfloat16", "pallas", True, "gelu", False, "xla"),
      ("pallas", "bfloat16", "pallas", True, "gelu", False, "xla"),
      ("cudnn", "bfloat16", "pallas", True, "gelu_new", False, "xla"),
      ("cudnn", "bfloat16", "pallas", True, "gelu", True, "xla"),
      ("dot_product", "float32", "xla", True, "gelu", True, "xla"),
      ("einsum", "bfloat16", "xla", False, "gelu", False, "mosaic"),
      ("pallas", "bfloat16", "pallas", True, "gelu", False, "mosaic"),
      ("pallas", "bfloat16", "pallas", True, "gelu", False, "mosaic_pingpong"))]
  hopper = hopper_matmul.is_hopper(jax.devices()[0])
  for variant in variants:
    config = base.replace(**variant)
    attention_impl, dtype, layer_norm_impl, pruned, hidden_act, stacked, feed_forward_impl = variant.values()
    name = (f"{attention_impl:>11} {dtype:>8} {layer_norm_impl:>6}" + (" pruned" if pruned else "")
            + (f" {hidden_act}" if hidden_act != "gelu" else "") + (" stacked" if stacked else "")
            + (f" ffn={feed_forward_impl}" if feed_forward_impl != "xla" else ""))
    if feed_forward_impl != "xla" and not hopper:
      print(f"{name}: not run, its kernels need a Hopper GPU (sm_90); this is {jax.devices()[0].device_kind}")
      continue
    ref_loss, ref_flat, ref_real = references[hidden_act]
    variant_params = {**params, "bert": hf.stack_layers(params["bert"])} if stacked else params
    try:
      (loss, grads), out = (_loss_and_grads(config, variant_params, inputs),
                            _sequence_output(config, variant_params, inputs))
    except Exception as e:  # pylint: disable=broad-except  # report every variant, then fail
      failures += 1
      print(f"{name}: ERROR {type(e).__name__}: {str(e)[:300]}")
      continue
    loss_rel = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
    grad_rel = _rel_l2(_flat(hf.unstack_layers(grads)), ref_flat)
    out_rel = _rel_l2(np.asarray(out, np.float32)[real], ref_real)
    finite = bool(np.isfinite(_flat(grads)).all() and np.isfinite(np.asarray(out, np.float32)).all())
    loss_tol, tol = TOLERANCES[dtype]
    ok = finite and loss_rel <= loss_tol and grad_rel <= tol and out_rel <= tol
    failures += not ok
    print(f"{name}: loss rel {loss_rel:.2e} (tol {loss_tol:.0e}), gradients rel L2 "
          f"{grad_rel:.2e}, output rel L2 {out_rel:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
  try:
    failures += _check_flash_attention_dropout()
  except Exception as e:  # pylint: disable=broad-except  # reported as a failed check, after the others
    failures += 1
    print(f"pallas attention dropout: ERROR {type(e).__name__}: {str(e)[:300]}")
  try:
    failures += _check_add_norm_dropout(base, params, inputs)
  except Exception as e:  # pylint: disable=broad-except  # reported as a failed check, after the others
    failures += 1
    print(f"add & norm with hidden dropout: ERROR {type(e).__name__}: {str(e)[:300]}")
  print("all within tolerance" if not failures else f"{failures} variant(s) FAILED")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())

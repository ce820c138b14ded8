"""Fine-tuning BERT on IMDB sentiment (Maas et al. 2011): `configs/imdb.py[:PRESET]`.

Presets: '' (bert-base-uncased, the BERT paper's recipe), 'minilm' (all-MiniLM-L6-v2 from a local
HF directory), 'long' (max length 512), 'tiny' (random-init 2-layer model on a sample: a smoke test).
"""

import ml_collections

from configs import common


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
  # attention_impl 'auto': our fused C++ attention kernel on a CPU (computing in float32), our Pallas
  # flash attention on a GPU in bf16 (--config.model.dtype=bfloat16), else einsums; all with dropout;
  # layer_norm_impl 'auto': the add & norm in one Pallas kernel on a GPU, in one C++ kernel on a CPU in
  # float32, else XLA's;
  # feed_forward_impl 'xla' (a checkpoint trained with 'mosaic' evaluates anywhere; not yet timed);
  # prune_last_layer: the last layer computes [CLS] only, all the classifier reads (configs/common.py).
  config.model = common.model_overrides(num_labels=2, attention_impl="auto", layer_norm_impl="auto",
                                        feed_forward_impl="xla", prune_last_layer=common.PRUNE_LAST_LAYER)

  config.data = ml_collections.ConfigDict()
  config.data.data_dir = common.IMDB  # aclImdb .tar.gz or folder; '' = tfds imdb_reviews
  config.data.max_seq_length = 128
  config.data.validation_fraction = 0.1
  config.data.max_train_examples = 0  # 0 = all
  config.data.max_test_examples = 0  # 0 = all
  # Increasing lengths, e.g. (128, 256, 384): each batch is cut to the first that holds its longest
  # review (reviews of similar length are batched together), not padded to max_seq_length. () = off.
  config.data.length_buckets = ()
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

  config.optimizer = common.optimizer(warmup_fraction=0.1)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2  # the latest K, plus the best by validation accuracy
  config.checkpoint.export_hf = True  # write the best model to WORKDIR/hf_model at the end

  config.mesh_shape = common.MESH_SHAPE  # (data, fsdp, tensor); -1 takes the remaining devices
  config.xla_flags = common.XLA_FLAGS  # added before JAX starts; your XLA_FLAGS win
  config.cpu_reuse_buffers = common.CPU_REUSE_BUFFERS  # on a CPU with glibc: see configs/common.py
  config.parallelism = "jit"  # 'jit' over that mesh, or 'pmap' over every device (data parallel only)

  config.evaluate = ml_collections.ConfigDict()
  config.evaluate.checkpoint = "best"  # best | latest

  config.predict = ml_collections.ConfigDict()
  config.predict.input_file = ""  # one text per line; '' = stdin
  config.predict.batch_size = 32

  if preset == "minilm":
    config.init_checkpoint = common.MINILM
    config.learning_rate = 5e-5
    config.train.num_epochs = 1.0  # a CPU-sized budget: 27 minutes on 2 cores (docs/performance.md, "ninth")
  elif preset == "long":
    config.data.max_seq_length = 512
    config.data.length_buckets = (128, 256, 384)  # most reviews are far shorter than 512 tokens
    config.train.grad_accum_steps = 4  # the same batch of 32, in micro-batches of 8 for memory
  elif preset == "tiny":
    config.init_checkpoint = ""
    config.tokenizer = common.MINILM
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

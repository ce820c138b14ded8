"""BERT pretraining (masked LM + next sentence prediction) on raw text: `configs/pretrain.py[:PRESET]`.

Presets: '' (BERT-base from scratch, the BERT paper's seq-128 phase), 'tiny' (a 2-layer model on a
sample of the IMDB unlabelled reviews: minutes on a CPU), 'minilm' (MiniLM-L6 size from scratch),
'continue' (continued in-domain pretraining of the all-MiniLM-L6-v2 checkpoint, whose missing MLM and
NSP heads start fresh; its result is an `init_checkpoint` for configs/imdb.py).
"""

import ml_collections

from configs import common


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "pretrain"  # the loop of bert_jax.train, with the MLM + NSP heads and loss
  config.mode = "train"
  config.seed = 42
  # '' pretrains from random init (config.model sets the size); or a HF BERT directory, hub id,
  # 'pip:PACKAGE', or a bert_jax workdir, to continue pretraining it.
  config.init_checkpoint = ""
  config.tokenizer = "bert-base-uncased"  # an existing WordPiece vocab, or one from `python -m bert_jax.vocab`
  config.learning_rate = 1e-4

  # None keeps BertConfig's default (bert-base) or the checkpoint's. attention_impl 'auto': our fused
  # C++ attention kernel on a CPU (it computes in float32), our Pallas flash attention on a GPU in
  # bf16, else the einsums (each with attention dropout); layer_norm_impl 'auto': the add & norm
  # in one Pallas kernel on a GPU, in one C++ kernel on a CPU in float32, else XLA's;
  # feed_forward_impl 'xla' (a checkpoint trained with 'mosaic' evaluates anywhere; not yet timed);
  # prune_last_layer: the last layer computes only [CLS] and the masked positions, all the heads
  # read (configs/common.py).
  config.model = common.model_overrides(attention_impl="auto", layer_norm_impl="auto", feed_forward_impl="xla",
                                        prune_last_layer=common.PRUNE_LAST_LAYER)

  config.data = ml_collections.ConfigDict()
  # A text file or folder of them (one sentence per line, blank line between documents), or an
  # aclImdb archive/folder (its unlabelled train/unsup reviews). '' reads tfds_name instead.
  config.data.data_dir = common.IMDB
  config.data.tfds_name = ""  # a tensorflow-datasets text dataset, e.g. 'imdb_reviews'
  config.data.tfds_split = "unsupervised"
  config.data.tfds_text_key = "text"
  config.data.max_documents = 0  # 0 = all
  config.data.validation_fraction = 0.01  # of documents, held out for the MLM/NSP metrics
  config.data.max_seq_length = 128
  config.data.short_seq_prob = 0.1  # pairs shorter than max_seq_length, so short inputs are seen too
  config.data.masked_lm_prob = 0.15
  config.data.max_predictions_per_seq = 20
  config.data.whole_word_masking = False
  config.data.dupe_factor = 1  # pair constructions per document (masking is re-drawn every epoch anyway)
  config.data.cache_dir = ""  # '' = WORKDIR/cache

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256  # global, per optimizer update
  config.train.grad_accum_steps = 1
  config.train.num_train_steps = 900_000  # the BERT paper's seq-128 phase; 0 = from num_epochs
  config.train.num_epochs = 1.0  # used when num_train_steps is 0
  config.train.on_nonfinite = "stop"  # a NaN/Inf loss or gradient: 'stop' the run, or 'skip' the update
  config.train.eval_batch_size = 256
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 10_000  # held-out MLM/NSP metrics and a checkpoint; also at the end

  config.optimizer = common.optimizer(warmup_fraction=0.01)  # 10k of 1M steps in BERT; name: adamw | lamb

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 2  # the latest K, plus the best by held-out MLM accuracy
  config.checkpoint.export_hf = True  # BertForPreTraining in HF format at WORKDIR/hf_model

  config.mesh_shape = common.MESH_SHAPE  # (data, fsdp, tensor); -1 takes the remaining devices
  config.xla_flags = common.XLA_FLAGS  # added before JAX starts; your XLA_FLAGS win
  config.cpu_reuse_buffers = common.CPU_REUSE_BUFFERS  # on a CPU with glibc: see configs/common.py
  config.parallelism = "jit"  # 'jit' over that mesh, or 'pmap' over every device (data parallel only)

  if preset == "tiny":
    config.tokenizer = common.MINILM  # bert-base-uncased's vocab, available offline
    # More, smaller updates at a higher rate learn faster per CPU-minute than 600 of batch 64 at 1e-3
    # with hidden 64 (held-out MLM accuracy 0.060 then; see docs/pretraining.md).
    config.learning_rate = 2e-3
    config.model.update(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                        max_position_embeddings=128)
    config.data.max_documents = 20_000
    config.data.validation_fraction = 0.02
    config.data.max_seq_length = 64
    config.data.max_predictions_per_seq = 10
    config.train.batch_size = 32
    config.train.eval_batch_size = 128
    config.train.num_train_steps = 1200
    config.train.log_every_steps = 50
    config.train.eval_every_steps = 300
    config.checkpoint.every_steps = 300
    config.optimizer.warmup_fraction = 0.05
  elif preset == "minilm":
    config.tokenizer = common.MINILM
    config.learning_rate = 5e-4
    config.model.update(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
  elif preset == "continue":
    config.init_checkpoint = common.MINILM
    config.tokenizer = ""  # the checkpoint's vocab
    config.learning_rate = 5e-5
    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    config.train.num_train_steps = 200  # a CPU-sized budget: ~20 minutes on 2 cores
    config.train.log_every_steps = 25
    config.train.eval_every_steps = 100
    config.checkpoint.every_steps = 100
    config.optimizer.warmup_fraction = 0.1
  elif preset:
    raise ValueError(f"Unknown preset {preset!r} for configs/pretrain.py; use one of '', 'tiny', 'minilm', "
                     "'continue'.")
  return config

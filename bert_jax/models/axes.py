"""The logical axis names of BERT's parameters and activations; `bert_jax.partitioning` maps them to a mesh."""

# Parameters.
EMBED, MLP, HEADS, KV = "embed", "mlp", "heads", "kv"
VOCAB, POSITION, TOKEN_TYPE, CLASSES = "vocab", "position", "token_type", "classes"
# Output axis of the square hidden->hidden projections (pooler, MLM transform): an array cannot
# name one logical axis twice.
EMBED_OUT = "embed_out"
# The stacked layer axis of scanned parameters (`config.scan_layers`).
LAYERS = "layers"
# Activations have names of their own: a weight's `embed` may be sharded (fsdp) where an
# activation's must not be, since its batch axis already uses that mesh axis.
ACT_BATCH, ACT_LENGTH = "activation_batch", "activation_length"
ACT_EMBED, ACT_MLP = "activation_embed", "activation_mlp"

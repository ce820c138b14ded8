"""BERT models in Flax Linen: `from bert_jax.models import BertModel, BertForSequenceClassification`."""

from bert_jax.models.attention import resolve_attention_impl
from bert_jax.models.bert import BertModel, BertOutput, describe_kernels, resolve_layer_norm_impl
from bert_jax.models.config import COMPUTE_FIELDS, BertConfig
from bert_jax.models.heads import BertForPreTraining, BertForSequenceClassification, PreTrainingOutput

MODEL_CLASSES = {cls.__name__: cls for cls in (BertModel, BertForPreTraining, BertForSequenceClassification)}

__all__ = ["COMPUTE_FIELDS", "BertConfig", "BertModel", "BertOutput", "BertForPreTraining",
           "BertForSequenceClassification", "PreTrainingOutput", "MODEL_CLASSES", "describe_kernels",
           "resolve_attention_impl", "resolve_layer_norm_impl"]

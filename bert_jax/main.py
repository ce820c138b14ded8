"""Entry point: `python -m bert_jax.main --config=configs/imdb.py[:PRESET] --workdir=DIR [--config.KEY=V]`.

Parses flags, checks the config, joins the processes of a multi-host run (`partitioning.initialize_distributed`)
and hands the config to train (which saves it to the workdir), evaluate or predict.
"""

import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bert_jax import config_checks
from bert_jax import evaluate
from bert_jax import host_memory
from bert_jax import partitioning
from bert_jax import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of configuration and input errors.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/imdb.py:minilm.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

# Errors that mean "the input or config is wrong", reported as one message rather than a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, UnicodeDecodeError)


class _QuietLibraries(py_logging.Filter):
  """Keeps Orbax's per-save chatter (dozens of INFO lines) out of the progress log; warnings pass."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config, workdir = flags.FLAGS.config, _WORKDIR.value
  try:
    config_checks.check(config)
    partitioning.add_xla_flags(config.get("xla_flags", ""))  # before JAX starts a backend
    dispatched = host_memory.dispatch_on_caller(config.get("cpu_reuse_buffers", False))  # likewise
    partitioning.initialize_distributed()  # before anything asks JAX for its devices
    host_memory.keep_heap(dispatched)
    os.makedirs(workdir, exist_ok=True)
    if config.mode == "train":
      train.train_and_evaluate(config, workdir)
    elif config.mode == "evaluate":
      evaluate.evaluate(config, workdir)
    else:
      evaluate.predict(config, workdir)
  except train.Preempted as e:  # a clean stop: the checkpoint is durable, a rerun resumes
    logging.warning("%s", e)
    print(str(e), file=sys.stderr)
    sys.exit(0)
  except (train.Diverged, *USER_ERRORS) as e:
    if _VERBOSE.value:
      raise
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a one-line error for a config key that does not exist (not a traceback)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a value of the wrong type, a missing required flag
    if "--verbose" in argv:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except (KeyError, AttributeError) as e:  # ml_collections: unknown key, with "Did you mean ...?"
    if "--verbose" in argv:
      raise
    message = " ".join(line.strip() for line in str(e.args[0] if e.args else e).splitlines())
    print(f"error: unknown config key {message} (the config file lists the keys).", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

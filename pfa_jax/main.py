"""Command line: the only module that defines flags.

  python -m pfa_jax.main --config configs/simple_cnn_cifar10.py:runlocal \
    --workdir runs/demo --config.job=all

Jobs (``config.job``):

* ``train``: train ``config.model`` in ``<workdir>/train`` (resumes from its
  latest checkpoint);
* ``compress``: ``config.method`` with every recipe on the trained checkpoint
  (``config.compress.source``, default ``<workdir>/train``), results in
  ``<workdir>/compress``;
* ``evaluate``: evaluate the trained checkpoint, ``<workdir>/evaluate``;
* ``all``: train, then compress;
* ``schedule``: a multi-step schedule on the trained checkpoint (CF layer by
  layer, FCP rounds; ``config.schedule``), ``<workdir>/schedule``.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pfa_jax import hostmem

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config',
  None,
  'Experiment config file (configs/*.py[:args]).',
  lock_config=True,
)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
flags.mark_flags_as_required(['config', 'workdir'])

JOBS = ('train', 'compress', 'evaluate', 'all', 'schedule')


def run(config, workdir: str) -> dict:
  """Dispatches ``config.job``; returns the job's result dict."""
  # Imported here so `--help` and flag errors are instant.
  from pfa_jax import checkpoint  # noqa: PLC0415
  from pfa_jax import compress  # noqa: PLC0415
  from pfa_jax import input_pipeline  # noqa: PLC0415
  from pfa_jax import metrics  # noqa: PLC0415
  from pfa_jax import train  # noqa: PLC0415

  if config.job not in JOBS:
    raise ValueError(f'config.job must be one of {JOBS}, got {config.job!r}.')
  input_pipeline.get_spec(config.input.dataset)  # Unknown dataset: fail now.
  tfds_source = input_pipeline.source(config) == 'tfds'  # Bad source: now.
  if config.job in ('compress', 'all'):
    compress.validate(config)  # Bad method/recipe/option: fail now.
  if config.job == 'schedule':
    from pfa_jax import schedules  # noqa: PLC0415

    schedules.check(config)
  from pfa_jax import models  # noqa: PLC0415

  models.resolve(config.model.name)  # Unknown model or class: fail now.
  train.distill_settings(config)  # Bad distill.weight/temperature: fail now.
  if config.job in ('train', 'all'):
    check_model_config(config)
  if tfds_source:  # The npz source never imports TensorFlow.
    input_pipeline.configure_tf()
  out = {}
  if config.job in ('train', 'all'):
    train_dir = os.path.join(workdir, 'train')
    result = train.train_and_evaluate(config, train_dir)
    out['train'] = {
      **result.metrics,
      'arch': result.arch,
      **metrics.provenance(),
    }
    metrics.write_json(os.path.join(train_dir, 'result.json'), out['train'])
  if config.job in ('compress', 'all'):
    out['compress'] = compress.compress(
      config, os.path.join(workdir, 'compress')
    )
  if config.job == 'schedule':  # CF layer by layer, FCP rounds
    out['schedule'] = schedules.run(config, os.path.join(workdir, 'schedule'))
  if config.job == 'evaluate':
    source = config.compress.source or os.path.join(workdir, 'train')
    model, variables, arch, step = checkpoint.restore_model(source)
    ev = train.evaluate_model(config, model, variables)
    out['evaluate'] = {
      **ev,
      'step': step,
      'arch': arch,
      'source': source,
      **metrics.provenance(),
    }
    eval_dir = os.path.join(workdir, 'evaluate')
    metrics.write_config(config, eval_dir)
    metrics.write_json(os.path.join(eval_dir, 'result.json'), out['evaluate'])
  return out


def check_model_config(config) -> None:
  """Builds ``config.model`` abstractly: bad widths/sizes fail in a second."""
  from pfa_jax import input_pipeline  # noqa: PLC0415
  from pfa_jax import models  # noqa: PLC0415

  spec = input_pipeline.get_spec(config.input.dataset)
  classes = input_pipeline.check_classes(config.input.classes, spec.num_classes)
  model = models.get_model(
    config.model.name,
    num_classes=len(classes) or spec.num_classes,
    **dict(config.model.kw),
  )
  size = int(config.input.image_size)
  models.check_input(model, (size, size, 3))


_PROGRESS = 'Setting work unit notes: %s'  # clu ReportProgress (steps/s, ETA)


class _QuietFilter:
  """Keeps WARNING+ (orbax's only from ERROR) and INFO from pfa_jax.

  Everything else at INFO (orbax, clu's per-scalar logging writer and
  parameter tables, absl, tf) is dropped. clu's ``ReportProgress`` note is
  kept and relabelled as the progress line (steps/s, %, ETA).
  """

  def filter(self, record):
    path = record.pathname.replace(os.sep, '/')
    if '/orbax/' in path:
      return record.levelno >= 40
    if record.levelno >= 30:
      return True
    if record.msg == _PROGRESS:
      record.msg = 'progress: %s'
      return True
    return '/pfa_jax/' in path or '/experiments/' in path


def quiet_third_party_logs(verbose: bool = False) -> None:
  """One line per phase: drops library INFO chatter (not with ``verbose``).

  Before TensorFlow is imported (it serves only the input pipeline), its C++
  log level and its oneDNN graph rewrites are set unless the user set them:
  with the rewrites on it prints a banner at import that its log level does
  not silence (they speed up TF's own convolutions and matmuls, which the
  pipeline has none of).
  """
  import logging as std_logging  # noqa: PLC0415

  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  if verbose:
    return
  # On the loggers too, not only their current handlers: a library may add a
  # root handler later (e.g. logging.basicConfig), and logger filters run
  # before any handler sees the record.
  targets = [std_logging.getLogger('absl'), std_logging.getLogger()]
  targets += std_logging.getLogger().handlers + [logging.get_absl_handler()]
  for target in targets:
    if not any(isinstance(f, _QuietFilter) for f in target.filters):
      target.addFilter(_QuietFilter())


def main(argv):
  hostmem.retain_freed_memory()  # before the first JAX computation
  if not FLAGS['verbosity'].present:  # Default: our INFO lines, quietly.
    logging.set_verbosity(logging.INFO)
  quiet_third_party_logs(verbose=FLAGS.verbosity > 0)
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  import jax  # noqa: PLC0415

  logging.info(
    'JAX process %d/%d, devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.devices(),
  )
  run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)

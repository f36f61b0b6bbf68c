"""CLI error paths: clear, early errors before any expensive work."""

import logging as std_logging
import os
import subprocess
import sys
import tempfile

import ml_collections
from absl.testing import absltest

from configs import simple_cnn_cifar10
from pfa_jax import main as pfa_main

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**kw):
  c = simple_cnn_cifar10.get_config('runlocal')
  for k, v in kw.items():
    node = c
    *path, leaf = k.split('.')
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


class MainErrorTest(absltest.TestCase):
  def test_unknown_model(self):
    with self.assertRaisesRegex(ValueError, "Unknown model 'vgg19'"):
      pfa_main.run(_config(**{'model.name': 'vgg19'}), tempfile.mkdtemp())

  def test_unknown_dataset(self):
    with self.assertRaisesRegex(ValueError, 'mnist'):
      pfa_main.run(_config(**{'input.dataset': 'mnist'}), tempfile.mkdtemp())

  def test_unknown_job(self):
    with self.assertRaisesRegex(ValueError, "config.job.*'fly'"):
      pfa_main.run(_config(job='fly'), tempfile.mkdtemp())

  def test_missing_data_says_how_to_fix(self):
    c = _config(**{'input.data_dir': tempfile.mkdtemp()})
    with self.assertRaisesRegex(FileNotFoundError, 'TFDS_DATA_DIR'):
      pfa_main.run(c, tempfile.mkdtemp())

  def test_flag_type_error_is_clear(self):
    # ml_collections rejects a wrong-typed override with the field's name.
    proc = subprocess.run(
      [
        sys.executable,
        '-m',
        'pfa_jax.main',
        '--config',
        'configs/simple_cnn_cifar10.py:runlocal',
        '--workdir',
        tempfile.mkdtemp(),
        '--config.num_epochs=lots',
      ],
      cwd=_ROOT,
      capture_output=True,
      text=True,
      timeout=120,
    )
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn('num_epochs', proc.stderr)

  def test_bad_model_arguments_fail_before_any_data(self):
    data_dir = tempfile.mkdtemp()  # Empty: reading data would fail later.
    cases = [
      ({'model.kw.width_mult': 0.0}, 'width_mult'),
      ({'input.image_size': 8}, r'8x8x3 is too small.*conv7'),
    ]
    for kw, pattern in cases:
      c = _config(**{'input.data_dir': data_dir, **kw})
      with self.assertRaisesRegex(ValueError, pattern):
        pfa_main.run(c, tempfile.mkdtemp())

  def test_bad_distill_settings_fail_early(self):
    c = _config(**{'input.data_dir': tempfile.mkdtemp()})
    with c.unlocked():
      c.distill = ml_collections.ConfigDict(
        {'weight': -0.1, 'temperature': 4.0}
      )
    with self.assertRaisesRegex(ValueError, r'distill\.weight.*-0\.1'):
      pfa_main.run(c, tempfile.mkdtemp())

  def test_quiet_filter(self):
    def record(path, level, msg='x'):
      return std_logging.LogRecord('absl', level, path, 1, msg, (), None)

    f = pfa_main._QuietFilter()
    info, warn, err = std_logging.INFO, std_logging.WARNING, std_logging.ERROR
    self.assertTrue(f.filter(record('/r/pfa_jax/train.py', info)))
    self.assertFalse(f.filter(record('/v/clu/metric_writers/x.py', info)))
    self.assertFalse(f.filter(record('/v/orbax/checkpoint/m.py', warn)))
    self.assertTrue(f.filter(record('/v/orbax/checkpoint/m.py', err)))
    self.assertTrue(f.filter(record('/v/tensorflow/x.py', warn)))
    progress = record('/v/clu/platform/local.py', info, pfa_main._PROGRESS)
    self.assertTrue(f.filter(progress))
    self.assertEqual(progress.msg, 'progress: %s')

  def test_quiet_sets_tensorflow_env_unless_the_user_did(self):
    keys = ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS')
    saved = {k: os.environ.pop(k, None) for k in keys}
    try:
      pfa_main.quiet_third_party_logs(verbose=True)  # env only, no filters
      self.assertEqual([os.environ[k] for k in keys], ['2', '0'])
      os.environ['TF_ENABLE_ONEDNN_OPTS'] = '1'
      pfa_main.quiet_third_party_logs(verbose=True)
      self.assertEqual(os.environ['TF_ENABLE_ONEDNN_OPTS'], '1')
    finally:
      for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
          os.environ[k] = v

  def test_compress_without_checkpoint(self):
    c = _config(job='compress')
    with self.assertRaisesRegex(FileNotFoundError, 'checkpoint'):
      pfa_main.run(c, tempfile.mkdtemp())


if __name__ == '__main__':
  absltest.main()

"""Every `python -m pfa_jax.main` command the README shows parses, validates
and (slow) runs at its :runlocal scale."""

import os
import re
import shlex
import tempfile

import pytest
import tensorflow_datasets as tfds
from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
from ml_collections import config_flags

from pfa_jax import compress
from pfa_jax import main as pfa_main

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[list[str]]:
  """argv lists of every `python -m pfa_jax.main` command in README.md."""
  with open(os.path.join(_ROOT, 'README.md')) as f:
    text = f.read().replace('\\\n', ' ')
  lines = [
    m.strip() for m in re.findall(r'^python -m pfa_jax\.main .*$', text, re.M)
  ]
  return [shlex.split(line)[2:] for line in lines]


def parse(argv, runlocal=False):
  """Parses argv exactly as pfa_jax.main's flags do (lock_config=True)."""
  argv = list(argv)
  if runlocal:
    i = argv.index('--config') + 1
    path, _, arg = argv[i].partition(':')
    argv[i] = f'{path}:{arg + "," if arg else ""}runlocal'
  fv = flags.FlagValues()
  # config_flags reads the --config.* overrides from sys_argv.
  config_flags.DEFINE_config_file(
    'config',
    None,
    '',
    flag_values=fv,
    lock_config=True,
    sys_argv=['main', *argv],
  )
  flags.DEFINE_string('workdir', None, '', flag_values=fv)
  cwd = os.getcwd()
  os.chdir(_ROOT)
  try:
    fv(['main', *argv])
  finally:
    os.chdir(cwd)
  return fv.config, fv.workdir


_COMMANDS = readme_commands()


class ReadmeCommandsTest(parameterized.TestCase):
  def test_readme_has_commands(self):
    self.assertGreaterEqual(len(_COMMANDS), 5)

  @parameterized.parameters(*[(c,) for c in _COMMANDS])
  def test_parses_and_validates(self, argv):
    config, workdir = parse(argv)
    self.assertTrue(workdir)
    if config.job in ('compress', 'all'):
      self.assertNotEmpty(compress.validate(config))
    # Tuple fields really were overridden.
    for a in argv:
      if a.startswith('--config.recipes='):
        self.assertEqual(
          config.recipes,
          eval(a.partition('=')[2]),  # noqa: S307 (README text)
        )

  def test_bad_override_is_a_clear_error(self):
    with self.assertRaisesRegex((ValueError, flags.Error), 'recipe'):
      config, _ = parse(
        [
          '--config',
          'configs/vgg16_cifar10.py',
          '--workdir',
          'x',
          '--config.recipes=(1,)',
        ]
      )
      compress.validate(config)


@pytest.mark.slow
class ReadmeCommandsRunTest(parameterized.TestCase):
  """Each command end to end at :runlocal on mock CIFAR (slow)."""

  @parameterized.parameters(*[(c,) for c in _COMMANDS])
  def test_runs(self, argv):
    config, _ = parse(argv, runlocal=True)
    workdir = tempfile.mkdtemp()
    with config.unlocked():
      if not config.model.name.startswith('resnet'):  # resnet8 is tiny already
        config.model.kw.width_mult = 1 / 16
      if ':' not in config.model.name:  # a user's class has one conv path
        config.model.kw.conv_impl = 'xla'
      config.input.train_subset = 32
      config.input.eval_subset = 32
      config.input.batch_size = 16
      config.input.eval_batch_size = 16
      config.input.shuffle_buffer = 32
      config.num_epochs = 0.5
      config.compress.num_batches = 2
      config.compress.batch_size = 16
      config.compress.recalibrate_batches = 1
      config.finetune.num_epochs = 0.5
    with tfds.testing.mock_data(num_examples=32):
      if config.job == 'compress':  # needs a trained model first
        train_config = config.copy_and_resolve_references()
        train_config.job = 'train'
        pfa_main.run(train_config, workdir)
      out = pfa_main.run(config, workdir)
    if config.job in ('compress', 'all'):
      self.assertNotEmpty(out['compress']['recipes'])
      for row in out['compress']['recipes'].values():
        self.assertIn('accuracy_finetuned', row)


if __name__ == '__main__':
  absltest.main()

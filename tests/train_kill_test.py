"""A SIGKILLed train job keeps its metrics.jsonl rows; a resume adds no dups."""

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest

from pfa_jax import metrics

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child reports each row on stdout only after JsonlWriter returned, so
# every reported row must be in the file when the parent kills it.
_CHILD = textwrap.dedent(
  """
  import json, os, sys, time
  import jax
  jax.config.update('jax_disable_most_optimizations', True)
  import flax.linen as nn
  import jax.numpy as jnp
  import ml_collections
  import tensorflow_datasets as tfds
  from pfa_jax import metrics, train

  workdir, slow = sys.argv[1], sys.argv[2] == 'slow'
  write = metrics.JsonlWriter.write_scalars

  def write_scalars(self, step, scalars):
    write(self, step, scalars)
    print(json.dumps({'step': int(step), 'keys': sorted(scalars)}), flush=True)
    if slow:
      time.sleep(0.2)

  metrics.JsonlWriter.write_scalars = write_scalars

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.relu(nn.Conv(4, (3, 3), strides=4)(x))
      return nn.Dense(10)(x.mean((1, 2)))

  model = Net()
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  config = ml_collections.ConfigDict(dict(
    seed=0, model=dict(name='net', kw={}), num_epochs=6.0,
    input=dict(dataset='cifar10', data_dir='', batch_size=16,
               eval_batch_size=32, train_subset=0, eval_subset=0, classes=[],
               augment=False, shuffle_buffer=64, image_size=32),
    optim=dict(name='sgd', lr=0.05, momentum=0.9, nesterov=False,
               weight_decay=0.0, schedule='constant', boundaries=[],
               decay_factor=0.1, warmup_epochs=0.0, bn_l1=0.0),
    log_every_steps=1, eval_every_epochs=2.0, ckpt_every_steps=4,
    keep_ckpts=2))
  arch = {'name': 'net', 'kwargs': {}}
  with tfds.testing.mock_data(num_examples=64):
    train.train_and_evaluate(config, workdir, init=(model, variables, arch))
  print('DONE', flush=True)
  """
)


def _child(script, workdir, mode):
  env = {
    **os.environ,
    'PYTHONPATH': _ROOT,
    'TF_CPP_MIN_LOG_LEVEL': '3',
    'CUDA_VISIBLE_DEVICES': '',
  }
  env.pop('XLA_FLAGS', None)  # One CPU device is enough here.
  return subprocess.Popen(
    [sys.executable, script, workdir, mode],
    cwd=_ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )


class KillTest(absltest.TestCase):
  def test_sigkill_keeps_rows_and_resume_has_no_duplicates(self):
    with tempfile.TemporaryDirectory() as root:
      script = os.path.join(root, 'child.py')
      with open(script, 'w') as f:
        f.write(_CHILD)
      workdir = os.path.join(root, 'w')
      proc = _child(script, workdir, 'slow')
      reported = []
      try:
        for line in proc.stdout:
          row = json.loads(line)
          reported.append(row)
          if row['step'] >= 11:  # Past the checkpoints at steps 4 and 8.
            os.kill(proc.pid, signal.SIGKILL)
            break
      finally:
        proc.wait(timeout=120)
      self.assertEqual(proc.returncode, -signal.SIGKILL)
      path = os.path.join(workdir, metrics.METRICS_FILE)
      on_disk = metrics.read_jsonl(path)
      present = {(r['step'], k) for r in on_disk for k in r if k != 'step'}
      for row in reported:
        for k in row['keys']:
          self.assertIn((row['step'], k), present)
      self.assertGreaterEqual(max(r['step'] for r in on_disk), 11)

      proc = _child(script, workdir, 'fast')
      out, _ = proc.communicate(timeout=300)
      self.assertEqual(proc.returncode, 0)
      self.assertIn('DONE', out)
      rows = metrics.read_jsonl(path)
    steps_of = collections.defaultdict(list)
    for r in rows:
      for k in r:
        if k != 'step':
          steps_of[k].append(r['step'])
    for k, steps in steps_of.items():
      self.assertEqual(len(steps), len(set(steps)), k)
    self.assertEqual(sorted(steps_of['train_loss']), list(range(1, 25)))
    self.assertEqual(sorted(steps_of['eval_accuracy']), [8, 16, 24])
    # Rows kept from before the kill are the killed run's own values.
    before = {r['step']: r for r in on_disk if 'train_loss' in r}
    after = {r['step']: r for r in rows if 'train_loss' in r}
    for step in range(1, 9):
      self.assertEqual(before[step]['train_loss'], after[step]['train_loss'])


if __name__ == '__main__':
  absltest.main()

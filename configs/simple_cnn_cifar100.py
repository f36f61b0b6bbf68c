"""SimpleCNN (All-CNN-C + BN) on CIFAR-100: the paper's ablation net (§4.2, Fig. 3-4).

The CIFAR-10 config (`configs/simple_cnn_cifar10.py`) on CIFAR-100; same
schedule, runlocal and commands with this file's name.
"""

from configs import simple_cnn_cifar10


def get_config(arg=None):
  c = simple_cnn_cifar10.get_config(arg)
  c.input.dataset = 'cifar100'
  return c

"""ResNet-56 (option A) on CIFAR-100 (paper Table 1).

The CIFAR-10 config (`configs/resnet56_cifar10.py`) on CIFAR-100; same
schedule, runlocal and commands with this file's name.
"""

from configs import resnet56_cifar10


def get_config(arg=None):
  c = resnet56_cifar10.get_config(arg)
  c.input.dataset = 'cifar100'
  return c

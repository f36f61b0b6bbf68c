"""VGG-16 (cifar.torch) on CIFAR-100 (paper Table 1: 3x smaller, +1.4 pp).

The CIFAR-10 config (`configs/vgg16_cifar10.py`) on CIFAR-100; same
schedule, runlocal and commands with this file's name.
"""

from configs import vgg16_cifar10


def get_config(arg=None):
  c = vgg16_cifar10.get_config(arg)
  c.input.dataset = 'cifar100'
  return c

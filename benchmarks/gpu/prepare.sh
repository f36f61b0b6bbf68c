#!/usr/bin/env bash
# Prepares a device run on the lent GPU machine (issue 12, section 5). Run
# here, from the repository root, before the device tool's `run`:
#
#   bash benchmarks/gpu/prepare.sh [SHARED]     # SHARED defaults to ../shared
#
# The GPU image (Python 3.12, jax 0.11.2 + CUDA, torch, flax, optax, orbax,
# chex) has no TensorFlow, TFDS, clu or ml_collections and no registry. This
# puts, in folders .git/info/exclude ignores (so only `carry` takes them):
#   .whl/      clu and ml_collections wheels (pure Python; their other
#              requirements are in the image; clu's TensorFlow writer is
#              replaced by pfa_jax.clu_compat there);
#   .gpu_data/ the CIFAR-10 JPEG copy (18.8 MiB) and the converter, which
#              decodes it to arrays with Pillow (--export-npz): the
#              training run reads them with input.source='npz'.
# Then: run(command='bash benchmarks/gpu/run.sh', carry=['.whl', '.gpu_data'],
#           timeout_s=600)
set -euo pipefail
shared=${1:-../shared}
exclude=.git/info/exclude
for d in /.whl/ /.gpu_data/; do
  grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"
done
mkdir -p .whl .gpu_data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp -d .whl $(grep -E "^(clu|ml_collections)==" requirements.txt)
cp "$shared/datasets/cifar10_jpeg.npz" "$shared/datasets/make_tfds_data_dir.py" .gpu_data/
du -sh .whl .gpu_data

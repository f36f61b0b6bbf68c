#!/usr/bin/env bash
# The GPU device run of issue 12, section 5, as one command on the lent
# machine (prepare here first: benchmarks/gpu/prepare.sh):
#
#   run(command='bash benchmarks/gpu/run.sh', carry=['.whl', '.gpu_data'],
#       timeout_s=600)
#
# Everything it writes lands in $OUT (at most 8 files come back):
#   train_throughput_gpu.json  JAX against PyTorch on the GPU, float32;
#   pfa_core_gpu.json          streaming statistics against a device GEMM;
#   pruned_speedup_gpu.json    PFA-pruned VGG-16 / ResNet-56 against full;
#   train_{config,metrics,result}.json(l)  one epoch of ResNet-56 on
#                              CIFAR-10 read from the .npz copy
#                              (input.source='npz');
#   gpu_run.log                this script's output.
# Each part has its own time limit (540 s in all, so one call of the
# 15-minute device budget holds it), and one failing does not stop the next.
#
# PFA_JAX_DEVICE=cpu PFA_JAX_GPU_SMOKE=1 runs the same steps at toy sizes
# on the CPU (tests/gpu_script_test.py), with PFA_JAX_GPU_ARRAYS naming a
# folder that already holds cifar10_arrays.npz.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results (the device tool sets it)}"
device=${PFA_JAX_DEVICE:-gpu}
smoke=${PFA_JAX_GPU_SMOKE:-0}
arrays=${PFA_JAX_GPU_ARRAYS:-/tmp/pfa_jax_cifar}
run_dir=${PFA_JAX_GPU_RUN_DIR:-/tmp/pfa_jax_gpu_run}
exec > >(tee -a "$OUT/gpu_run.log") 2>&1

step() { # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s) $(date -u +%T)"
  timeout "$limit" "$@"
  echo "== $name: exit $? $(date -u +%T)"
}

if [ -d .whl ]; then # clu and ml_collections, which the image lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/pfa_jax_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/pfa_jax_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export PFA_JAX_BENCH_RESULTS=$OUT
# Preflight: what the image must provide beside the carried wheels (clu
# needs wrapt and etils; the decoder Pillow; the throughput part PyTorch,
# which the smoke run leaves out), before any GPU time is spent.
PFA_JAX_GPU_SMOKE=$smoke python3 - <<'PY' || exit 1
import importlib.util, os, sys
need = ('jax', 'flax', 'optax', 'orbax.checkpoint', 'numpy', 'scipy', 'PIL',
        'clu', 'ml_collections', 'wrapt', 'etils', 'absl', 'yaml',
        'threadpoolctl')
if os.environ['PFA_JAX_GPU_SMOKE'] != '1':
  need += ('torch',)
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
  sys.exit(f'missing Python packages: {missing}; carry them as wheels')
import jax
print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

if [ ! -f "$arrays/cifar10_arrays.npz" ]; then
  step decode 60 python3 .gpu_data/make_tfds_data_dir.py \
    --input .gpu_data/cifar10_jpeg.npz --export-npz "$arrays" --decoder pil
fi

if [ "$smoke" = 1 ]; then
  throughput=(--models simple_cnn --steps 1 --repeats 1 --warmup-rounds 0
    --gap 0 --modes train --batch 8 --no-torch)
  stats=(--only selection)
  speedup=(--cases resnet8:inner --factors 2 --batches 2 --repeats 1
    --round-to 1)
  train=(configs/simple_cnn_cifar10.py:runlocal 1)
else
  throughput=(--steps 20 --repeats 3)
  stats=(--only throughput,error --at-scale)
  speedup=(--cases vgg16_cifar:inner+stream,resnet56:inner --batches 1,128
    --repeats 3 --round-to 1)
  train=(configs/resnet56_cifar10.py 1)
fi

step throughput 150 python3 -m benchmarks.train_throughput --device "$device" \
  "${throughput[@]}"
step stats 90 python3 -m benchmarks.pfa_core "${stats[@]}"
step speedup 120 python3 -m benchmarks.pruned_speedup "${speedup[@]}"
step train 120 python3 -m pfa_jax.main --config "${train[0]}" \
  --workdir "$run_dir" --config.job=train \
  --config.num_epochs="${train[1]}" --config.input.source=npz \
  --config.input.data_dir="$arrays"
for f in config.json metrics.jsonl result.json; do
  cp "$run_dir/train/$f" "$OUT/train_$f" 2>/dev/null
done
ls -la "$OUT"

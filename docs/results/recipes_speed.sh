#!/bin/bash
# Training speed of the `recipes` study's four arms, one run at a time, in A B C D A B C D ... order
# (docs/results.md, section 11). Each run: the study's model and batch, STEPS training steps, 1 torch thread;
# tokens/s is read from the run's summary.json (training steps only). Usage: recipes_speed.sh OUT [REPS] [STEPS]
set -euo pipefail
OUT=${1:?output folder}; REPS=${2:-3}; STEPS=${3:-40}
PY=${PYTHON:-python}
COMMON=(--model.dim=128 --model.num_layers=4 --model.num_heads=4 --model.context=128 --data.max_bytes=4000000
        --train.batch_size=16 --train.eval_batches=4 --train.device=cpu --train.max_steps=$STEPS
        --train.eval_every=100000 --train.checkpoint_every=100000 --threads 1 --no-progress)
FINE=(--model.moe.hidden_dim=64 --model.moe.num_experts=32 --model.moe.top_k=7 --model.moe.num_shared_experts=1)
declare -A ARM
ARM[dense]="--preset dense --model.dense_hidden_dim=512"
ARM[coarse-top2]="--preset default --model.moe.hidden_dim=256 --model.moe.num_experts=8 --model.moe.top_k=2"
ARM[fine-shared]="--preset default ${FINE[*]}"
ARM[fine-shared-auxfree]="--preset default ${FINE[*]} --model.moe.router.aux_loss_coef=0.0 --model.moe.router.bias_update_rate=1e-3"
mkdir -p "$OUT"
for rep in $(seq 1 "$REPS"); do
  for arm in dense coarse-top2 fine-shared fine-shared-auxfree; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 nice "$PY" -m moekit train ${ARM[$arm]} "${COMMON[@]}" --out "$OUT/$arm-$rep" > /dev/null
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], round(s['tokens_per_s']))" \
      "$OUT/$arm-$rep/summary.json" "$arm" "$rep" | tee -a "$OUT/speed.txt"
  done
done

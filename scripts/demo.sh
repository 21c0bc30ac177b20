#!/usr/bin/env bash
# The main job on a laptop-sized CPU: three synthetic hospitals, one federated brain-age model. A few minutes on
# 2 cores; it ends by printing every site's test MAE beside predicting the training mean (the table README shows).
# One torch thread per site by default, so the numbers do not depend on how many cores the machine has.
set -euo pipefail
cd "$(dirname "$0")/.."
SUBJECTS=${SUBJECTS:-40}
NEUROFED=${NEUROFED:-.venv/bin/neurofed}
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$SECONDS
$NEUROFED synth --out data/synth --sites ixi,sald,camcan --subjects "$SUBJECTS" --resolution 2 --seed 0
$NEUROFED simulate --roots data/synth/ixi,data/synth/sald,data/synth/camcan \
  fit --config configs/federated_demo.yaml --trainer.overwrite true
"$PYTHON" - <<'PY'
import json

from neurofed.metrics import format_table

rows = json.load(open("checkpoints/demo/test_metrics.json"))
print(f"\ntest (demo, {len(rows) - 1} site(s))\n{format_table(rows)}")
PY
echo "demo finished in $((SECONDS - start)) s"

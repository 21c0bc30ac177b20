#!/usr/bin/env bash
# The main job on a laptop-sized CPU: three synthetic hospitals, one federated brain-age model (FedBN: see the
# comment in configs/federated_demo.yaml). A few minutes on 2 cores; the last table compares every site's test
# MAE with predicting the training mean.
set -euo pipefail
cd "$(dirname "$0")/.."
SUBJECTS=${SUBJECTS:-40}
NEUROFED=${NEUROFED:-.venv/bin/neurofed}
start=$SECONDS
$NEUROFED synth --out data/synth --sites ixi,sald,camcan --subjects "$SUBJECTS" --resolution 2 --seed 0
$NEUROFED simulate --roots data/synth/ixi,data/synth/sald,data/synth/camcan \
  fit --config configs/federated_demo.yaml
echo "demo finished in $((SECONDS - start)) s"

#!/usr/bin/env bash
# The main job on a laptop-sized CPU: three synthetic hospitals, one federated brain-age model.
set -euo pipefail
cd "$(dirname "$0")/.."
SUBJECTS=${SUBJECTS:-40}
.venv/bin/neurofed synth --out data/synth --sites ixi,sald,camcan --subjects "$SUBJECTS" --resolution 2 --seed 0
.venv/bin/neurofed simulate --roots data/synth/ixi,data/synth/sald,data/synth/camcan \
  fit --config configs/federated_demo.yaml

#!/usr/bin/env bash
# zeda-rl's prepared GPU check (issue 24, item 4): a thin wrapper over tests/gpu/device_check.py,
# which holds the steps, the skip reasons, the time budget and the summary writer (tests/gpu/README.md).
#
#   bash tests/gpu/run_device_check.sh [--steps moe_layer,model,copy,learner] [--budget 540] [--out DIR]
#
# Results: device_check.json, device_check.md and device_check.log in --out, default $OUT (the folder the
# device tool brings back), else runs/device_check. Wheels in wheels/ are installed first when missing.
# PYTHON picks the interpreter (default python3: on the device machine, the one that holds PyTorch).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" tests/gpu/device_check.py "$@"

#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (the workplace's device tool), so that its few
# minutes go to measuring, not to finding out what is there. On the device machine, in the
# repository root:
#
#   bash experiments/device_session.sh            # results under $OUT (the tool brings them back)
#
# 1. what the machine has (GPU, python, the packages servesim needs): machine.txt;
# 2. `servesim calibrate --model small --device cuda --quick`: profile.json, calibrate.log;
# 3. `experiments/fidelity.py` with that one profile on unseen workloads: fidelity.md,
#    fidelity.json, fidelity.log.
# Each stage has a time limit, so a hang costs its stage, not the session. Preparation (here,
# before the call: the machine reaches no network and ../shared does not travel), then carry
# `.device`:
#
#   mkdir -p .device && cp -r ../shared/traces .device/traces
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .device/whl simpy==4.1.2
#
# Overrides (environment): DEVICE (cuda), MODEL (small), WORKLOADS (azure-conv,sharegpt-poisson),
# LOADS (0.5,0.85), POLICIES (continuous,chunked), LIVE_S (8), REPEATS (3), CALIBRATE_S (200),
# FIDELITY_S (300). With DEVICE=cpu MODEL=tiny and a small cell it runs on any machine.
set -u -o pipefail
out=${OUT:-runs/device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
device=${DEVICE:-cuda}
model=${MODEL:-small}
traces=.device/traces
[ -d "$traces" ] || traces=../shared/traces

{
    echo "== $(date -u +%FT%TZ) $(uname -m), $(nproc) cores"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    else
        echo "nvidia-smi: none"
    fi
    python3 - <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "numpy", "scipy", "simpy", "click", "tqdm", "matplotlib", "aiohttp", "transformers",
             "safetensors"):
    try:
        print(f"  {name:<13}{version(name)}")
    except PackageNotFoundError:
        print(f"  {name:<13}missing")
try:
    import torch
    if torch.cuda.is_available():
        print("  cuda", torch.version.cuda, torch.cuda.get_device_name(0))
    else:
        print("  cuda: not available to torch")
except Exception:
    pass
EOF
} 2>&1 | tee "$out/machine.txt"

if ! python3 -c "import simpy" 2>/dev/null; then
    if ls .device/whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/servesim-site .device/whl/*.whl || exit 2
        export PYTHONPATH=/tmp/servesim-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "simpy is missing and no wheel was carried (.device/whl): see this script's header" | tee -a "$out/machine.txt"
        exit 2
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "$device" != cpu ] && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "no CUDA device for torch here: nothing to calibrate" | tee -a "$out/machine.txt"
    exit 3
fi

echo "== calibrate $model on $device ($(date -u +%T))"
# `servesim` without installing the package (the image holds its dependencies but not it)
timeout "${CALIBRATE_S:-200}" python3 -c "from experiments.cli import main; main()" calibrate --model "$model" \
    --device "$device" --quick -o "$out/profile.json" > "$out/calibrate.log" 2>&1
status=$?
tail -20 "$out/calibrate.log"
if [ ! -f "$out/profile.json" ]; then
    echo "calibration wrote no profile (exit $status): see calibrate.log"
    exit 4
fi

fidelity_dir=$(mktemp -d)  # a fresh directory: fidelity.py resumes from what one holds
echo "== fidelity ($(date -u +%T))"
timeout "${FIDELITY_S:-300}" python3 experiments/fidelity.py --profile "$out/profile.json" --traces "$traces" \
    --workloads "${WORKLOADS:-azure-conv,sharegpt-poisson}" --loads "${LOADS:-0.5,0.85}" \
    --policies "${POLICIES:-continuous,chunked}" --live-s "${LIVE_S:-8}" --repeats "${REPEATS:-3}" \
    -o "$fidelity_dir" > "$out/fidelity.log" 2>&1
status=$?
tail -25 "$out/fidelity.log"
cp "$fidelity_dir/fidelity.md" "$fidelity_dir/fidelity.json" "$out/" 2>/dev/null
echo "== done ($(date -u +%T)), fidelity exit $status"
exit "$status"

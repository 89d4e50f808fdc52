#!/usr/bin/env bash
# One prepared GPU check (one H100/H200, random weights, <= 8 minutes), printing one JSON line:
#   sampler: released-size (1B) transformer at 1024x1024, bf16, batch 1, CFG 9: seconds per step and the
#            48-step total of the official sampler and of the fast setting (default: the feature cache,
#            --cache-refresh 3), eager and with torch.compile, and the peak GPU memory
#            (benchmarks/gpu_check.py; at most ~2.7 minutes, then it skips what is left);
#   train:   one training step of the 1B model at 512x512, bf16, batch 16, through the trainer's own step:
#            seconds per step and MFU against the measured bf16 matmul peak and against the spec sheet's
#            dense bf16 peak (989 TFLOP/s for H100/H200 SXM) (benchmarks/train_speed.py; at most 90 s).
#   memory:  the released 1B architecture (random weights, released layout, built first) at 1024x1024, CFG 9,
#            64 steps: peak VRAM (torch.cuda.max_memory_allocated), s/step and s/image at 48 and 64 steps for
#            fp32, bf16, bf16 + banded VQ decode, bf16 + model offload, int8, int8 + banded, int8 + model
#            offload, int4, each in a fresh process (benchmarks/memory.py; at most 200 s, then it skips
#            what is left).
#   fid:     Inception features of 128 PNGs (512x512) one image per forward vs batches of 32 and 64: images/s and
#            the network's share of the GPU's float32 matmul peak (benchmarks/fid_speed.py; at most 30 s).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    # the same code on the CPU with tiny shapes, in seconds
#
# A part that fails or runs out of time is reported under its key as {"error": ...}; the line is always printed.
set -u
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
SMOKE=0
FAST="cache_refresh=3"
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    --fast=*) FAST="${arg#--fast=}" ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--smoke] [--fast=FIELD=VALUE,...]" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ "$SMOKE" = 1 ]; then
  timeout 300 "$PY" benchmarks/gpu_check.py --smoke --fast "$FAST" >"$tmp/sampler.out" 2>"$tmp/sampler.err"
  echo $? >"$tmp/sampler.rc"
  timeout 300 "$PY" benchmarks/train_speed.py --model tiny --resolution 64 --precision bf16 --batch 2 --steps 1 \
    --warmup 1 --device cpu --json >"$tmp/train.out" 2>"$tmp/train.err"
  echo $? >"$tmp/train.rc"
  timeout 300 bash -c "\"$PY\" -c 'import sys; from meissonic_cli.model.scaffold import build_tiny_model_folder as b; b(sys.argv[1])' \
    \"$tmp/tiny\" && \"$PY\" benchmarks/memory.py --model \"$tmp/tiny\" --device cpu --resolution 64 --steps 2 \
    --settings fp32,bf16+banded,int8,int8+offload --json" >"$tmp/memory.out" 2>"$tmp/memory.err"
  echo $? >"$tmp/memory.rc"
  timeout 120 "$PY" benchmarks/fid_speed.py --images 4 --size 64 --batch-sizes 1,4 --repeats 1 --json \
    >"$tmp/fid.out" 2>"$tmp/fid.err"
  echo $? >"$tmp/fid.rc"
else
  timeout 160 "$PY" benchmarks/gpu_check.py --fast "$FAST" --budget-s 125 >"$tmp/sampler.out" 2>"$tmp/sampler.err"
  echo $? >"$tmp/sampler.rc"
  timeout 200 bash -c "\"$PY\" benchmarks/memory.py --build \"$tmp/m1b\" >/dev/null && \"$PY\" benchmarks/memory.py \
    --model \"$tmp/m1b\" --device cuda --steps 64 --timeout 60 --budget-s 130 --json" >"$tmp/memory.out" 2>"$tmp/memory.err"
  echo $? >"$tmp/memory.rc"
  timeout 90 "$PY" benchmarks/train_speed.py --model 1b --resolution 512 --precision bf16 --batch 16 --steps 3 \
    --warmup 2 --device cuda --json >"$tmp/train.out" 2>"$tmp/train.err"
  echo $? >"$tmp/train.rc"
  timeout 30 "$PY" benchmarks/fid_speed.py --device cuda --images 128 --size 512 --batch-sizes 1,32,64 --repeats 1 \
    --json >"$tmp/fid.out" 2>"$tmp/fid.err"
  echo $? >"$tmp/fid.rc"
fi

"$PY" - "$tmp" "$SMOKE" <<'EOF'
import json, sys
from pathlib import Path

tmp, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
SPEC_BF16 = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16, SXM spec sheets


def part(name):
    rc = int((tmp / f"{name}.rc").read_text().strip() or 1)
    text = (tmp / f"{name}.out").read_text()
    if rc != 0:
        err = (tmp / f"{name}.err").read_text().strip().splitlines()
        why = "timed out" if rc == 124 else f"exit {rc}"
        return {"error": f"{why}: {err[-1] if err else 'no message'}"[:400]}
    try:  # gpu_check prints one line; train_speed an indented object
        return json.loads(text[text.index("{"):])
    except ValueError as e:
        return {"error": f"unreadable output: {e}"}


out = {"smoke": smoke, "sampler": part("sampler"), "memory": part("memory"), "fid": part("fid")}
train = part("train")
if "runs" in train:
    run = train["runs"][0]
    spec = next((v for k, v in SPEC_BF16.items() if k in str(train.get("device", ""))), None)
    train = {
        "device": train["device"], "resolution": train["resolution"], "precision": train["precision"],
        "batch": run.get("batch"), "oom": run.get("oom", False), "s_per_step": run.get("s_per_step"),
        "tflop_per_step": (run.get("flops_per_step") or 0) / 1e12, "mfu_vs_measured_matmul": run.get("mfu"),
        "matmul_peak_tflops": train["matmul_peak_tflops"], "peak_memory_gib": run.get("peak_memory_gib"),
        "mfu_vs_spec": (run["flops_per_step"] / run["s_per_step"] / spec) if spec and "flops_per_step" in run else None,
    }
out["train"] = train
print(json.dumps(out))
EOF

#!/usr/bin/env bash
# The one prepared GPU check: parity tests, the training benchmark and a 200-step training run of the
# bundled model on one device, with one JSON summary and a log.
#
# Usage:
#   scripts/gpu-check.sh bundle DIR [--device cpu]
#       On the build machine: packs the `lora` binary and the parity test binary (tests/device.rs),
#       stripped, into DIR/binaries.tar.xz, and downloads the diffusers wheel (plus importlib_metadata,
#       which the GPU image lacks) into DIR/wheels.
#       Binaries come from target/cuda/release (scripts/cuda-build.sh build), or from target/release
#       with --device cpu.
#   scripts/gpu-check.sh OUTDIR [--device cuda:0|cpu] [--bundle DIR] [--python PY] [--train-steps N]
#       On the GPU machine (no Rust, no network): runs the checks and writes OUTDIR/summary.json and
#       OUTDIR/gpu-check.log. Binaries and wheels come from --bundle DIR (default: the binaries
#       of the local build, as for `bundle`). `--device cpu` is the dry run on a CPU machine.
#
# Environment: LORA_DIFFUSERS (default: the diffusers pin of scripts/requirements.txt),
# GPU_CHECK_PARITY_S / GPU_CHECK_BENCH_S / GPU_CHECK_TRAIN_S (time limits, default 210 / 150 / 90 s).
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'gpu-check: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

device=cuda:0
bundle=
python=python3
train_steps=200
mode=run
target=

parse_args() {
    while [[ $# -gt 0 ]]; do
        case $1 in
        --device) device=${2:?--device needs a value} && shift ;;
        --bundle) bundle=${2:?--bundle needs a folder} && shift ;;
        --python) python=${2:?--python needs a path} && shift ;;
        --train-steps) train_steps=${2:?--train-steps needs a number} && shift ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2 && exit 2 ;;
        -*) die "unknown option $1" ;;
        *) [[ -z $target ]] || die "one folder only (got $target and $1)" && target=$1 ;;
        esac
        shift
    done
    [[ -n $target ]] || die "give an output folder (or: bundle DIR); see --help"
    [[ $device == cpu || $device =~ ^cuda:[0-9]+$ ]] || die "--device $device: expected cpu or cuda:N"
    [[ $train_steps =~ ^[0-9]+$ && $train_steps -gt 0 ]] || die "--train-steps $train_steps: not a count"
}

# The local build's folder of binaries for the device.
build_dir() {
    if [[ $device == cpu ]]; then
        printf '%s\n' "${CARGO_TARGET_DIR:-$repo/target}/release"
    else
        printf '%s\n' "${CARGO_TARGET_DIR:-$repo/target/cuda}/release"
    fi
}

# The newest parity test binary (deps/device-<hash>) of a build folder.
newest_device_test() {
    local f best=
    for f in "$1"/deps/device-*; do
        [[ -f $f && -x $f && $f != *.* ]] || continue
        if [[ -z $best || $f -nt $best ]]; then best=$f; fi
    done
    [[ -n $best ]] || return 1
    printf '%s\n' "$best"
}

diffusers_pin() {
    if [[ -n ${LORA_DIFFUSERS:-} ]]; then
        printf '%s\n' "$LORA_DIFFUSERS"
    else
        grep -E '^diffusers==' "$repo/scripts/requirements.txt" || echo diffusers
    fi
}

make_bundle() {
    local dir=$target src t
    src=$(build_dir)
    [[ -x $src/lora ]] || die "no $src/lora; build first (scripts/cuda-build.sh build, or cargo build --release)"
    t=$(newest_device_test "$src") || die "no parity test binary in $src/deps; build the tests first"
    mkdir -p "$dir/wheels" "$dir/bin" || die "cannot create $dir"
    cp "$src/lora" "$dir/bin/lora" && cp "$t" "$dir/bin/device-test" || die "cannot copy the binaries"
    strip "$dir/bin/lora" "$dir/bin/device-test" 2>/dev/null || say "strip failed; binaries kept as built"
    # One xz stream with a 64 MiB dictionary stores the code both binaries share once.
    say "packing $dir/binaries.tar.xz"
    "$python" -c 'import sys, tarfile
with tarfile.open(sys.argv[1], "w:xz", preset=9) as t:
    for name in ("lora", "device-test"):
        t.add(sys.argv[2] + "/" + name, arcname=name)' "$dir/binaries.tar.xz" "$dir/bin" ||
        die "could not pack the binaries"
    rm -rf "$dir/bin"
    say "downloading $(diffusers_pin) and importlib_metadata wheels into $dir/wheels"
    "$python" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
        -d "$dir/wheels" "$(diffusers_pin)" importlib_metadata==8.7.0 >&2 ||
        die "pip could not download the wheels"
    du -ab "$dir" | sort -n >&2
}

# Unpacks the bundle's binaries into $1.
unpack_bundle() {
    "$python" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], filter="data")' "$bundle/binaries.tar.xz" "$1"
}

# ---- the run ----

log=
started=$(date +%s)
declare -A result=()

# Appends a command's output to the log; returns its status. $1 is the time limit in seconds.
logged() {
    local limit=$1
    shift
    printf '\n$ %s\n' "$*" >>"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
}

# Finds the folders holding the CUDA libraries the binary needs and puts them on LD_LIBRARY_PATH.
cuda_libraries() {
    local dirs=() d missing
    for d in $("$python" - 2>/dev/null <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
seen = []
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "*", "*", "lib")):
        if d not in seen and os.path.isdir(d):
            seen.append(d)
print("\n".join(seen))
EOF
    ) /usr/local/cuda/lib64 /usr/local/nvidia/lib64; do
        [[ -d $d ]] && dirs+=("$d")
    done
    if [[ ${#dirs[@]} -gt 0 ]]; then
        LD_LIBRARY_PATH=$(IFS=:; echo "${dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        export LD_LIBRARY_PATH
    fi
    printf 'LD_LIBRARY_PATH=%s\n' "${LD_LIBRARY_PATH:-}" >>"$log"
    missing=$(ldd "$bin/lora" 2>&1 | awk '/not found/ { print $1 }' | tr '\n' ' ')
    result[libs_missing]=$missing
    [[ -z $missing ]]
}

parity() {
    local t0=$SECONDS rc
    LORA_REPO=$repo LORA_BIN=$bin/lora LORA_TEST_DEVICE=$device LORA_REQUIRE_DEVICE=1 \
        logged "${GPU_CHECK_PARITY_S:-210}" "$bin/device-test" --test-threads=1 --nocapture
    rc=$?
    result[parity_rc]=$rc
    result[parity_s]=$((SECONDS - t0))
}

bench() {
    local t0=$SECONDS help args=()
    help=$("$bin/lora" bench train --help 2>&1)
    if ! grep -q -- '--device' <<<"$help"; then
        result[bench_skipped]="lora bench train has no --device option"
        say "bench: skipped (${result[bench_skipped]})"
        return
    fi
    if [[ -n ${torch_python:-} ]]; then args+=(--torch-python "$torch_python"); fi
    logged "${GPU_CHECK_BENCH_S:-150}" "$bin/lora" bench train --device "$device" --json "${args[@]}" \
        >/dev/null
    result[bench_rc]=$?
    result[bench_s]=$((SECONDS - t0))
}

# Installs the carried wheels into a private folder and checks that the PyTorch reference imports.
torch_reference() {
    local site=$work/site wheels=${bundle:+$bundle/wheels}
    if [[ -z $wheels || ! -d $wheels ]]; then
        result[torch_skipped]="no wheels folder (give --bundle DIR)"
        return
    fi
    if ! logged 120 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "$wheels"/*.whl; then
        result[torch_skipped]="pip could not install the carried wheels"
        return
    fi
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    if logged 120 "$python" -c 'import torch, diffusers, peft
from diffusers import UNet2DConditionModel
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__, "peft", peft.__version__)'; then
        torch_python=$python
        result[torch_versions]=$(grep -E '^torch ' "$log" | tail -1)
    else
        result[torch_skipped]="torch / diffusers / peft do not import (see the log)"
    fi
}

train() {
    local t0=$SECONDS out=$work/train
    logged "${GPU_CHECK_TRAIN_S:-90}" "$bin/lora" train --model "$repo/assets/tiny-sd" \
        --instance-data-dir "$repo/assets/demo-data" --instance-prompt "a photo of sks toy" \
        --resolution 64 --rank 4 --learning-rate 1e-3 --max-train-steps "$train_steps" --seed 1 \
        --device "$device" --output-dir "$out" --force
    result[train_rc]=$?
    result[train_s]=$((SECONDS - t0))
    result[train_csv]=$out/loss.csv
    [[ -f $out/loss.csv ]] && cp "$out/loss.csv" "$target/train-loss.csv"
}

# Writes summary.json from the results and the log.
summary() {
    local k
    for k in "${!result[@]}"; do export "GPU_CHECK_R_$k=${result[$k]}"; done
    GPU_CHECK_LOG=$log GPU_CHECK_DEVICE=$device GPU_CHECK_WALL=$(($(date +%s) - started)) \
        GPU_CHECK_STEPS=$train_steps "$python" - >"$target/summary.json" <<'EOF'
import csv, json, os, re
r = {k[len("GPU_CHECK_R_"):]: v for k, v in os.environ.items() if k.startswith("GPU_CHECK_R_")}
log = open(os.environ["GPU_CHECK_LOG"], errors="replace").read()
num = lambda k: int(r[k]) if k in r and r[k].lstrip("-").isdigit() else None

def last(pattern, text=log):
    m = re.findall(pattern, text, re.M)
    return m[-1] if m else None

out = {"device": os.environ["GPU_CHECK_DEVICE"], "wall_s": int(os.environ["GPU_CHECK_WALL"])}
gpu = last(r"^GPU: (.*)$")
if gpu:
    out["gpu"] = gpu
if r.get("libs_missing"):
    out["libraries_missing"] = r["libs_missing"].split()
res = re.findall(r"^test result: (\w+)\. (\d+) passed; (\d+) failed", log, re.M)
if "parity_rc" in r:
    out["parity"] = {
        "ok": num("parity_rc") == 0 and bool(res) and res[-1][0] == "ok",
        "passed": int(res[-1][1]) if res else 0,
        "failed": int(res[-1][2]) if res else None,
        "seconds": num("parity_s"),
        "skipped": re.findall(r"^(\w+): skipped, (.*)$", log, re.M) or None,
        "failures": re.findall(r"panicked at [^\n]*\n(.*)$", log, re.M) or None,
        "image_levels": [int(x) for x in re.findall(r"^image .*: cpu vs \S+: (\d+) levels$", log, re.M)],
        "grad_worst_rel": {c: float(v) for c, v in re.findall(
            r"^(\w+): \d+ LoRA gradients, cpu vs \S+: worst relative diff (\S+) at", log, re.M)},
        "train_loss_worst_diff": (lambda v: float(v) if v else None)(last(r"^training: .* worst diff (\S+)$")),
    }
if "bench_skipped" in r:
    out["bench"] = {"skipped": r["bench_skipped"]}
elif "bench_rc" in r:
    js = last(r"^(\{.*\})$")
    out["bench"] = {"ok": num("bench_rc") == 0, "seconds": num("bench_s"),
                    "result": json.loads(js) if js else None}
if "torch_skipped" in r:
    out["torch_reference"] = {"skipped": r["torch_skipped"]}
elif "torch_versions" in r:
    out["torch_reference"] = {"versions": r["torch_versions"]}
if "train_rc" in r:
    train = {"ok": num("train_rc") == 0, "steps_asked": int(os.environ["GPU_CHECK_STEPS"]),
             "seconds": num("train_s")}
    m = last(r"^trained to step (\d+) \((\d+) steps in ([\d.]+)s, ([\d.]+) it/s\), last loss (\S+)$")
    if m:
        train.update(steps=int(m[0]), train_seconds=float(m[2]), it_per_s=float(m[3]))
    path = r.get("train_csv")
    if path and os.path.isfile(path):
        losses = [float(row["loss"]) for row in csv.DictReader(open(path))]
        if losses:
            k = min(20, len(losses))
            train.update(first_loss_mean=sum(losses[:k]) / k, last_loss_mean=sum(losses[-k:]) / k)
    out["train"] = train
out["ok"] = (not out.get("libraries_missing") and out.get("parity", {}).get("ok", False)
             and out.get("train", {}).get("ok", False) and out.get("bench", {}).get("ok", True))
print(json.dumps(out, indent=1))
EOF
}

run_checks() {
    mkdir -p "$target" || die "cannot create $target"
    target=$(cd "$target" && pwd)
    log=$target/gpu-check.log
    : >"$log"
    command -v "$python" >/dev/null || die "no $python"
    work=$(mktemp -d) || die "no temporary folder"
    trap 'rm -rf "$work"' EXIT
    if [[ -n $bundle ]]; then
        bundle=$(cd "$bundle" && pwd) || die "no bundle folder $bundle"
        bin=$work/bin
        unpack_bundle "$bin" || die "cannot unpack $bundle/binaries.tar.xz"
    else
        local src
        src=$(build_dir)
        bin=$work/bin
        mkdir -p "$bin"
        ln -s "$src/lora" "$bin/lora"
        ln -s "$(newest_device_test "$src")" "$bin/device-test" 2>/dev/null
    fi
    [[ -x $bin/lora && -x $bin/device-test ]] ||
        die "need lora and device-test in $bin (make them with: scripts/gpu-check.sh bundle DIR)"
    say "device $device, binaries $bin, log $log"
    {
        date -u +'started %Y-%m-%dT%H:%M:%SZ'
        uname -a
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
                sed 's/^/GPU: /'
        fi
    } >>"$log" 2>&1
    if [[ $device != cpu ]] && ! cuda_libraries; then
        say "CUDA libraries not found: ${result[libs_missing]}"
    else
        say "parity tests (limit ${GPU_CHECK_PARITY_S:-210} s)"
        parity
        say "PyTorch reference"
        torch_reference
        say "bench"
        bench
        say "train $train_steps steps (limit ${GPU_CHECK_TRAIN_S:-90} s)"
        train
    fi
    summary || die "could not write $target/summary.json"
    cat "$target/summary.json"
    "$python" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' \
        "$target/summary.json"
}

if [[ ${1:-} == bundle ]]; then
    mode=bundle
    shift
fi
parse_args "$@"
cd "$repo" || exit 1
if [[ $mode == bundle ]]; then make_bundle; else run_checks; fi

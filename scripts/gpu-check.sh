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
#   scripts/gpu-check.sh stage DIR
#       After `bundle DIR` (DIR inside the repository), in the checkout the device tool sends: packs
#       the files the run reads (`needs`) into DIR/tree.tar.xz, then takes every tracked file but
#       this script out of what travels, leaving the files on disk: out of the index
#       (git rm --cached) and into .git/info/exclude between marker lines, DIR too. Refuses a tree
#       with uncommitted changes. Prints the travelling size (tracked + untracked-not-ignored +
#       DIR, as the device tool counts it) and the `carry` value and command of the one `run`
#       call; fails, restoring the tree, when that size is over 64 MiB.
#   scripts/gpu-check.sh unstage
#       Undoes `stage`: the index back to HEAD (git reset), its block out of .git/info/exclude.
#       Nothing to do when nothing is staged.
#   scripts/gpu-check.sh size [DIR]
#       Prints the travelling size of the checkout as it stands, plus the files of DIR.
#   scripts/gpu-check.sh needs
#       Lists the repository paths the run reads (files or folders), one a line.
#   scripts/gpu-check.sh OUTDIR [--device cuda:0|cpu] [--bundle DIR] [--python PY] [--train-steps N]
#       On the GPU machine (no Rust, no network): runs the checks and writes OUTDIR/summary.json and
#       OUTDIR/gpu-check.log. Binaries and wheels come from --bundle DIR (default: the binaries
#       of the local build, as for `bundle`); the files the run reads from DIR/tree.tar.xz when
#       `stage` made one, else from the checkout. `--device cpu` is the dry run on a CPU machine.
#
# Environment: LORA_DIFFUSERS (default: the diffusers pin of scripts/requirements.txt),
# GPU_CHECK_PARITY_S / GPU_CHECK_BENCH_S / GPU_CHECK_TRAIN_S (time limits, default 150 / 90 per batch
# size / 90 s; the bench runs the SD 1.5 UNet at 512 px, bf16, batch 1 and 4, beside the PyTorch
# reference; with the wheel install (60 s) and import check (45 s) at most 525 s, inside the device
# tool's 600 s per command; the --device cpu dry run gives the bench 240 s per batch size),
# GPU_CHECK_TRAVEL_LIMIT (bytes that may travel, default 67108864 = the device tool's 64 MiB).
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'gpu-check: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# The repository paths the run reads: tests/device.rs's fixtures (the sd2-tiny gradients load only
# its UNet and text encoder), the bundled model and the data of the 200-step training (a strace of
# the dry run opens exactly these files), and scripts/bench_train.py, which `lora bench train
# --torch-python` runs.
needed=(
    assets/demo-data
    assets/tiny-sd/model_index.json
    assets/tiny-sd/scheduler
    assets/tiny-sd/text_encoder
    assets/tiny-sd/tokenizer
    assets/tiny-sd/unet
    assets/tiny-sd/vae
    scripts/bench_train.py
    tests/fixtures/lora_formats/kohya.safetensors
    tests/fixtures/lora_grads/sd1_all.json
    tests/fixtures/lora_grads/sd1_all.safetensors
    tests/fixtures/lora_grads/sd2_attn.json
    tests/fixtures/lora_grads/sd2_attn.safetensors
    tests/fixtures/sd1-tiny
    tests/fixtures/sd1.outputs.safetensors
    tests/fixtures/sd1.pipeline.json
    tests/fixtures/sd2-tiny/text_encoder
    tests/fixtures/sd2-tiny/unet
    tests/fixtures/train-data
)
# The one tracked file that travels as it is: the entry point of the `run` call.
entry=scripts/gpu-check.sh

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
    if ! cp "$src/lora" "$dir/bin/lora" || ! cp "$t" "$dir/bin/device-test"; then
        die "cannot copy the binaries"
    fi
    strip "$dir/bin/lora" "$dir/bin/device-test" 2>/dev/null || say "strip failed; binaries kept as built"
    # One xz stream with a 64 MiB dictionary stores the code both binaries share once.
    say "packing $dir/binaries.tar.xz"
    "$python" -c 'import sys, tarfile
with tarfile.open(sys.argv[1], "w:xz", preset=9) as t:
    for name in ("lora", "device-test"):
        t.add(sys.argv[2] + "/" + name, arcname=name)' "$dir/binaries.tar.xz" "$dir/bin" ||
        die "could not pack the binaries"
    rm -rf "${dir:?}/bin"
    say "downloading $(diffusers_pin) and importlib_metadata wheels into $dir/wheels"
    "$python" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
        -d "$dir/wheels" "$(diffusers_pin)" importlib_metadata==8.7.0 >&2 ||
        die "pip could not download the wheels"
    du -ab "$dir" | sort -n >&2
}

# Unpacks the archive $1 into the folder $2.
unpack() {
    "$python" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], filter="data")' "$1" "$2"
}

# ---- staging: what travels to the device machine ----

limit=${GPU_CHECK_TRAVEL_LIMIT:-67108864}
mark_begin='# >>> scripts/gpu-check.sh stage (scripts/gpu-check.sh unstage removes this block)'
mark_end='# <<< scripts/gpu-check.sh stage'

# Git in the repository, every pathspec taken literally.
g() { git --literal-pathspecs "$@"; }

# The exclude file of this checkout; refuses one that other worktrees share.
exclude_file() {
    local gitdir f
    gitdir=$(g rev-parse --absolute-git-dir 2>/dev/null) || die "$repo is not a git checkout"
    f=$(g rev-parse --git-path info/exclude) || die "git rev-parse --git-path failed"
    [[ $f == /* ]] || f=$repo/$f
    [[ $f == "$gitdir"/* ]] || die "$repo is a linked worktree: its exclude file $f is shared with" \
        "the main checkout and the other worktrees; stage the checkout the device tool sends, or a clone"
    printf '%s\n' "$f"
}

is_staged() { [[ -f $1 ]] && grep -qxF "$mark_begin" "$1"; }

# Paths as .gitignore patterns that match only themselves.
glob_escape() { sed -e 's/[][\\*?]/\\&/g' -e 's/ $/\\ /'; }

# "BYTES<TAB>PATH" for each file that travels: tracked, untracked-not-ignored, the files under
# $1 (the carried folder, when given) and shared/.
travel_files() {
    {
        g ls-files -z --cached
        g ls-files -z --others --exclude-standard
        if [[ -n ${1:-} && -d $1 ]]; then find "$1" -type f -print0; fi
        if [[ -d shared ]]; then find shared -type f -print0; fi
    } | sort -zu | xargs -0 -r stat -c $'%s\t%n' -- 2>/dev/null
    return 0
}

mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

# Prints the travelling size; returns 1, naming the biggest files, when it is over the limit.
travel_size() {
    local list total tracked
    list=$(travel_files "${1:-}")
    total=$(awk -F'\t' '{ s += $1 } END { printf "%d", s }' <<<"$list")
    tracked=$(g ls-files -z --cached | xargs -0 -r stat -c %s -- 2>/dev/null |
        awk '{ s += $1 } END { printf "%d", s }')
    say "tracked files: $tracked bytes ($(mib "$tracked"))"
    say "travelling${1:+ with $1}: $total bytes ($(mib "$total")) in $(grep -c . <<<"$list") files;" \
        "limit $limit bytes ($(mib "$limit")), margin $((limit - total)) bytes ($(mib $((limit - total))))"
    if ((total > limit)); then
        say "over the limit by $((total - limit)) bytes; the biggest files that travel:"
        sort -t $'\t' -k1,1nr <<<"$list" | head -n 10 | sed 's/^/    /' >&2
        return 1
    fi
}

# The folder $1 as a path inside the repository, checked to be a bundle.
bundle_rel() {
    local abs top
    [[ -d $1 ]] || die "no bundle folder $1 (make it with: scripts/gpu-check.sh bundle $1)"
    abs=$(cd "$1" && pwd -P) && top=$(pwd -P)
    [[ $abs == "$top"/* ]] || die "the bundle folder $abs is not inside the repository $top" \
        "(the device tool carries only paths inside it)"
    printf '%s\n' "${abs#"$top"/}"
}

stage() {
    local exclude head dirty rel p others
    exclude=$(exclude_file) || exit 1
    ! is_staged "$exclude" || die "already staged (see $exclude); first: scripts/gpu-check.sh unstage"
    head=$(g rev-parse -q --verify HEAD) || die "no commit to stage from"
    dirty=$(g status --porcelain --untracked-files=no)
    [[ -z $dirty ]] || die "uncommitted changes to tracked files (commit or stash them, so that" \
        "unstage can restore the index exactly):"$'\n'"$dirty"
    rel=$(bundle_rel "$target") || exit 1
    [[ -f $rel/binaries.tar.xz ]] || die "no $rel/binaries.tar.xz (scripts/gpu-check.sh bundle $rel)"
    [[ -d $rel/wheels ]] || say "warning: no $rel/wheels: the PyTorch reference will be skipped"
    [[ -z $(g ls-files -- "$rel") ]] || die "$rel holds tracked files; give the bundle a folder of its own"
    for p in "${needed[@]}" "$entry"; do
        [[ -n $(g ls-files -- "$p") ]] || die "the run reads $p, which is not tracked at HEAD"
    done
    [[ $(g ls-files -z | tr -cd '\n' | wc -c) -eq 0 ]] ||
        die "a tracked path holds a newline; cannot exclude it"
    lists=$(mktemp -d) || die "no temporary folder"
    trap 'rm -rf "${lists:-}"' EXIT
    g ls-files -z -- "${needed[@]}" >"$lists/needed"
    g ls-files -z | grep -zvxF -- "$entry" >"$lists/removed"
    say "packing $(tr -cd '\0' <"$lists/needed" | wc -c) files the run reads into $rel/tree.tar.xz"
    # The commit's time on every entry: the same commit packs to the same bytes.
    if ! tar --null -T "$lists/needed" --owner=0 --group=0 --numeric-owner \
        --mtime="@$(g log -1 --format=%ct)" -cf - |
        xz -9 -T1 >"$rel/tree.tar.xz.tmp" || ! mv "$rel/tree.tar.xz.tmp" "$rel/tree.tar.xz"; then
        die "could not write $rel/tree.tar.xz"
    fi
    mkdir -p "$(dirname "$exclude")" || die "cannot create $(dirname "$exclude")"
    if [[ -s $exclude && $(tail -c 1 "$exclude") != "" ]]; then echo >>"$exclude"; fi
    {
        printf '%s\n# staged from %s\n' "$mark_begin" "$head"
        printf '/%s/\n' "$(glob_escape <<<"$rel")"
        tr '\0' '\n' <"$lists/removed" | glob_escape | sed 's|^|/|'
        printf '%s\n' "$mark_end"
    } >>"$exclude" || die "cannot write $exclude"
    if ! g rm -r --cached -q --pathspec-from-file="$lists/removed" --pathspec-file-nul; then
        unstage
        die "git rm --cached failed; the tree is unstaged again"
    fi
    if ! travel_size "$rel"; then
        unstage
        die "too much would travel; the tree is unstaged again"
    fi
    others=$(g ls-files --others --exclude-standard)
    if [[ -n $others ]]; then
        say "untracked files that travel too:"
        head -n 10 <<<"$others" | sed 's/^/    /' >&2
    fi
    say "staged: $entry is the one tracked file (do not commit until: scripts/gpu-check.sh unstage)"
    say "the device call, then scripts/gpu-check.sh unstage:"
    printf 'carry: ["%s"]\n' "$rel"
    # shellcheck disable=SC2016 # $OUT is the device tool's output folder, set over there
    printf 'command: scripts/gpu-check.sh "$OUT" --bundle %s\n' "$rel"
}

unstage() {
    local exclude from head
    exclude=$(exclude_file) || exit 1
    if ! is_staged "$exclude"; then
        say "nothing staged ($exclude has no block of this script)"
        return 0
    fi
    from=$(awk -v b="$mark_begin" 'f && /^# staged from / { print $4; exit } $0 == b { f = 1 }' "$exclude")
    head=$(g rev-parse -q --verify HEAD)
    [[ $from == "$head" ]] || die "HEAD is $head, but the tree was staged at $from: a commit made" \
        "while staged lacks the untracked files; check it (git show --stat HEAD) before restoring"
    g reset -q || die "git reset failed"
    if ! awk -v b="$mark_begin" -v e="$mark_end" \
        '$0 == b { skip = 1 } !skip { print } $0 == e { skip = 0 }' "$exclude" >"$exclude.tmp" ||
        ! mv "$exclude.tmp" "$exclude"; then
        die "cannot rewrite $exclude"
    fi
    say "unstaged: the index is HEAD's again, $exclude as before"
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
    LORA_REPO=$data LORA_BIN=$bin/lora LORA_TEST_DEVICE=$device LORA_REQUIRE_DEVICE=1 \
        logged "${GPU_CHECK_PARITY_S:-150}" "$bin/device-test" --test-threads=1 --nocapture
    rc=$?
    result[parity_rc]=$rc
    result[parity_s]=$((SECONDS - t0))
}

bench() {
    local t0=$SECONDS help args=() res=512 runs=5 batches=(1 4) b rc worst=0 limit=${GPU_CHECK_BENCH_S:-90}
    help=$("$bin/lora" bench train --help 2>&1)
    if ! grep -q -- '--batch' <<<"$help"; then
        result[bench_skipped]="lora bench train has no --device / --batch options"
        say "bench: skipped (${result[bench_skipped]})"
        return
    fi
    # The dry run takes the same path at a size a CPU finishes in seconds; building the random
    # SD 1.5 UNet on both sides and PyTorch's bf16 on a CPU without bf16 instructions take 75-95 s
    # per batch size on a 2-core AVX2 EPYC, so its limit is wider.
    if [[ $device == cpu ]]; then res=64 runs=1 batches=(1 2) limit=${GPU_CHECK_BENCH_S:-240}; fi
    if [[ -n ${torch_python:-} ]]; then args+=(--torch-python "$torch_python"); fi
    for b in "${batches[@]}"; do
        LORA_REPO=$data logged "$limit" "$bin/lora" bench train --device "$device" \
            --json --workload unet --resolution "$res" --batch "$b" --unet-runs "$runs" --no-full \
            --mixed-precision bf16 "${args[@]}" >/dev/null
        rc=$?
        [[ $rc -ne 0 ]] && worst=$rc
    done
    result[bench_rc]=$worst
    result[bench_s]=$((SECONDS - t0))
}

# Installs the carried wheels into a private folder and checks that the PyTorch reference imports.
torch_reference() {
    local site=$work/site wheels=${bundle:+$bundle/wheels}
    if [[ -z $wheels || ! -d $wheels ]]; then
        result[torch_skipped]="no wheels folder (give --bundle DIR)"
        return
    fi
    if ! logged 60 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "$wheels"/*.whl; then
        result[torch_skipped]="pip could not install the carried wheels"
        return
    fi
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    if logged 45 "$python" -c 'import torch, diffusers, peft
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
    logged "${GPU_CHECK_TRAIN_S:-90}" "$bin/lora" train --model "$data/assets/tiny-sd" \
        --instance-data-dir "$data/assets/demo-data" --instance-prompt "a photo of sks toy" \
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
    runs = [json.loads(j) for j in re.findall(r"^(\{.*\})$", log, re.M) if '"sd15_unet' in j]
    out["bench"] = {"ok": num("bench_rc") == 0 and bool(runs), "seconds": num("bench_s"), "results": runs}
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
        unpack "$bundle/binaries.tar.xz" "$bin" || die "cannot unpack $bundle/binaries.tar.xz"
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
    data=$repo
    if [[ -n $bundle && -f $bundle/tree.tar.xz ]]; then
        data=$work/tree
        unpack "$bundle/tree.tar.xz" "$data" || die "cannot unpack $bundle/tree.tar.xz"
    fi
    local p missing=()
    for p in "${needed[@]}"; do [[ -e $data/$p ]] || missing+=("$p"); done
    [[ ${#missing[@]} -eq 0 ]] || die "not under $data: ${missing[*]} (scripts/gpu-check.sh needs)"
    say "device $device, binaries $bin, files read from $data, log $log"
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
        say "parity tests (limit ${GPU_CHECK_PARITY_S:-150} s)"
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

case ${1:-} in
bundle)
    mode=bundle
    shift
    ;;
stage | unstage | size | needs)
    mode=$1
    shift
    [[ $# -le 1 ]] || die "$mode takes at most one folder (got: $*)"
    target=${1:-}
    if [[ -n $target && -d $target ]]; then target=$(cd "$target" && pwd -P); fi
    ;;
esac
cd "$repo" || exit 1
case $mode in
stage) stage ;;
unstage) unstage ;;
size)
    rel=
    if [[ -n $target ]]; then rel=$(bundle_rel "$target") || exit 1; fi
    travel_size "$rel"
    ;;
needs) printf '%s\n' "${needed[@]}" ;;
*)
    parse_args "$@"
    if [[ $mode == bundle ]]; then make_bundle; else run_checks; fi
    ;;
esac

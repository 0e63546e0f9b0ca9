#!/usr/bin/env bash
# Benchmark: `adapterkit merge` vs a plain `cp -r` of the same checkpoint.
#
# Usage: bench/merge_vs_cp.sh [WORKDIR] [RUNS]
#   WORKDIR  where the random TinyLlama-shaped checkpoint and the outputs live
#            (default: ${TMPDIR:-/tmp}/adapterkit-bench; needs ~5 GB free, ~7 GB with PEFT_PYTHON)
#   RUNS     timed runs of each command (default 5)
#
# Environment:
#   ADAPTERKIT=/path/to/adapterkit   use this binary instead of building target/release/adapterkit
#   ADAPTERKIT_MERGE_ARGS="..."      extra arguments appended to `adapterkit merge` (word-split)
#   PEFT_PYTHON=/path/to/python      also time bench/peft_merge.py once with this interpreter
#                                    (needs torch, transformers, peft)
#   BENCH_LAYERS=N                   decoder layers of the generated checkpoint (default 22;
#                                    a small N makes a quick smoke test)
#   BENCH_SYNC=0                     do not `sync` (untimed) before each timed command
#   BENCH_VERIFY=0                   skip checking the warm-up merge's output against a numpy
#                                    reference with bench/check_merge.py (~25 s at 22 layers)
#   BENCH_TIME_SYNC=1                time `CMD && sync` instead of CMD, for both cp and merge, so
#                                    the write-back of the output to disk is inside the timing
#
# See bench/README.md for what is measured and the caveats.
set -euo pipefail

die() { printf 'merge_vs_cp.sh: error: %s\n' "$*" >&2; exit 1; }
note() { printf '%s\n' "$*" >&2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKDIR=${1:-${TMPDIR:-/tmp}/adapterkit-bench}
RUNS=${2:-5}
LAYERS=${BENCH_LAYERS:-22}
SYNC=${BENCH_SYNC:-1}
TIME_SYNC=${BENCH_TIME_SYNC:-0}
VERIFY=${BENCH_VERIFY:-1}

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
[[ $LAYERS =~ ^[1-9][0-9]*$ ]] || die "BENCH_LAYERS must be a positive integer, got '$LAYERS'"
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is required (apt-get install time)"
/usr/bin/time -f '%e %M' true 2>/dev/null || die "/usr/bin/time does not accept -f; GNU time is required"
command -v python3 >/dev/null || die "python3 is required to generate the checkpoint"

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
BASE=$WORKDIR/base
ADAPTER=$WORKDIR/adapter
OUT_CP=$WORKDIR/out_cp
OUT_MERGE=$WORKDIR/out_merge
OUT_PEFT=$WORKDIR/out_peft
LOGDIR=$WORKDIR/logs
mkdir -p "$LOGDIR"

cleanup_outputs() { rm -rf "$OUT_CP" "$OUT_MERGE" "$OUT_PEFT"; }
trap cleanup_outputs EXIT
cleanup_outputs

# Bytes of BF16 tensor data of the generated checkpoint (embed + lm_head + final norm + layers).
base_bytes=$(( 2 * (2 * 32000 * 2048 + 2048 + LAYERS * (2*2048*2048 + 2*256*2048 + 3*5632*2048 + 2*2048)) ))

avail_bytes() { echo $(( $(df -Pk "$WORKDIR" | awk 'NR==2 {print $4}') * 1024 )); }

# ---------------------------------------------------------------------------------------------
# 1. The binary (resolved first, so a missing binary fails before the slow generation)
# ---------------------------------------------------------------------------------------------
if [[ -n ${ADAPTERKIT:-} ]]; then
    BIN=$ADAPTERKIT
    [[ -x $BIN ]] || die "ADAPTERKIT=$BIN is not an executable file"
else
    command -v cargo >/dev/null || die "cargo not found; install Rust or set ADAPTERKIT=/path/to/adapterkit"
    note "== cargo build --release -p adapterkit-cli =="
    (cd "$REPO" && cargo build --release -p adapterkit-cli) || die "cargo build --release -p adapterkit-cli failed"
    target=${CARGO_TARGET_DIR:-$REPO/target}
    [[ $target = /* ]] || target=$REPO/$target
    BIN=$target/release/adapterkit
    [[ -x $BIN ]] || die "build succeeded but $BIN does not exist (is the CLI's binary named 'adapterkit'?)"
fi
"$BIN" merge --help >/dev/null 2>&1 || die "'$BIN merge --help' failed: this adapterkit has no working 'merge' subcommand"

# ---------------------------------------------------------------------------------------------
# 2. The checkpoint (generated once; GENERATED.json is written last and records the layer count)
# ---------------------------------------------------------------------------------------------
generated_layers() {
    [[ -f $WORKDIR/GENERATED.json ]] || { echo none; return; }
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"])' "$WORKDIR/GENERATED.json" \
        2>/dev/null || echo none
}
if [[ $(generated_layers) != "$LAYERS" ]]; then
    need=$(( 2 * base_bytes + 512 * 1024 * 1024 ))
    (( $(avail_bytes) >= need )) || die "not enough free space in $WORKDIR: need ~$(( need >> 20 )) MiB"
    note "== generating a $LAYERS-layer TinyLlama-shaped checkpoint in $WORKDIR (once) =="
    rm -rf "$BASE" "$ADAPTER"
    python3 -c 'import numpy' 2>/dev/null \
        || die "python3 has no numpy: pip install numpy (generation needs only python3 + numpy)"
    python3 "$REPO/bench/gen_tinyllama.py" "$WORKDIR" --layers "$LAYERS" \
        || die "checkpoint generation failed"
fi
[[ -f $BASE/model.safetensors.index.json && -f $ADAPTER/adapter_model.safetensors ]] \
    || die "checkpoint in $WORKDIR is incomplete; delete $WORKDIR/GENERATED.json to regenerate"
need=$(( base_bytes + 512 * 1024 * 1024 ))
(( $(avail_bytes) >= need )) || die "not enough free space in $WORKDIR for one output: need ~$(( need >> 20 )) MiB"

MERGE_EXTRA=()
if [[ -n ${ADAPTERKIT_MERGE_ARGS:-} ]]; then
    read -r -a MERGE_EXTRA <<<"$ADAPTERKIT_MERGE_ARGS"
fi

# ---------------------------------------------------------------------------------------------
# 3. Timing helpers
# ---------------------------------------------------------------------------------------------
# timed NAME CMD...: runs CMD under GNU time, output to $LOGDIR/NAME.log; sets WALL (s) and RSS (KiB).
timed() {
    local name=$1; shift
    local tf=$LOGDIR/$name.time
    if [[ $SYNC != 0 ]]; then sync; fi
    if [[ $TIME_SYNC != 0 ]]; then
        # GNU time's %M is then the largest RSS of sh and the command (its waited-for child).
        set -- sh -c '"$@" && sync' sh "$@"
    fi
    if ! /usr/bin/time -f '%e %M' -o "$tf" "$@" >"$LOGDIR/$name.log" 2>&1; then
        note "---- $LOGDIR/$name.log (last 20 lines) ----"
        tail -n 20 "$LOGDIR/$name.log" >&2 || true
        die "'$*' failed ($(head -n1 "$tf" 2>/dev/null))"
    fi
    read -r WALL RSS < <(tail -n 1 "$tf")
}
run_cp() { rm -rf "$OUT_CP"; timed "$1" cp -r "$BASE" "$OUT_CP"; rm -rf "$OUT_CP"; }
run_merge() {
    rm -rf "$OUT_MERGE"
    timed "$1" "$BIN" merge "$BASE" "$ADAPTER" -o "$OUT_MERGE" "${MERGE_EXTRA[@]}"
    if [[ ${2:-} = check ]]; then
        local n out_bytes
        n=$(find "$OUT_MERGE" -maxdepth 1 -name '*.safetensors' | wc -l)
        (( n > 0 )) || die "merge exited 0 but wrote no .safetensors into $OUT_MERGE"
        out_bytes=$(du -sb "$OUT_MERGE" | cut -f1)
        note "   merge output: $n safetensors file(s), $(( out_bytes >> 20 )) MiB (base data: $(( base_bytes >> 20 )) MiB)"
        if [[ $VERIFY != 0 ]]; then
            python3 "$REPO/bench/check_merge.py" "$BASE" "$ADAPTER" "$OUT_MERGE" >&2 \
                || die "the merged checkpoint does not match the reference (BENCH_VERIFY=0 skips this check)"
        fi
    fi
    rm -rf "$OUT_MERGE"
}
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) exit 1; if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f", k/1024}'; }

# ---------------------------------------------------------------------------------------------
# 4. Warm-up (untimed) and the timed, alternating runs
# ---------------------------------------------------------------------------------------------
RESULTS=$WORKDIR/results-$(date +%Y%m%d-%H%M%S).txt
{
    echo "adapterkit merge vs cp -r  ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo "binary:   $BIN ($("$BIN" --version 2>/dev/null || echo 'version unknown'))"
    echo "commit:   $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "machine:  $(nproc) CPUs, $(free -m | awk '/^Mem:/ {print $2}') MiB RAM, $(uname -sr)"
    echo "workdir:  $WORKDIR ($(df -PT "$WORKDIR" | awk 'NR==2 {print $2 " on " $1}'))"
    echo "base:     $LAYERS layers, $(( base_bytes >> 20 )) MiB BF16 in $(find "$BASE" -maxdepth 1 -name '*.safetensors' | wc -l) shard(s); adapter $(( $(stat -c %s "$ADAPTER/adapter_model.safetensors") >> 20 )) MiB F32"
    echo "merge:    $BIN merge BASE ADAPTER -o OUT ${MERGE_EXTRA[*]}"
    echo "runs:     $RUNS (after one untimed warm-up of each; sync before each: $([[ $SYNC != 0 ]] && echo yes || echo no);" \
         "sync inside the timing: $([[ $TIME_SYNC != 0 ]] && echo yes || echo no))"
} | tee "$RESULTS"

note "== warm-up (untimed) =="
run_cp warmup-cp
run_merge warmup-merge check

printf '\n%-5s %12s %12s %12s %12s\n' run cp_wall_s cp_rss_MiB merge_wall_s merge_rss_MiB | tee -a "$RESULTS"
cp_walls=() cp_rss=() m_walls=() m_rss=()
for (( i = 1; i <= RUNS; i++ )); do
    run_cp "cp-$i";       cp_walls+=("$WALL"); cp_rss+=("$RSS")
    run_merge "merge-$i"; m_walls+=("$WALL");  m_rss+=("$RSS")
    printf '%-6s %12s %12s %12s %12s\n' "$i" "${cp_walls[-1]}" "$(mib "${cp_rss[-1]}")" \
        "${m_walls[-1]}" "$(mib "${m_rss[-1]}")" | tee -a "$RESULTS"
done

cp_med=$(printf '%s\n' "${cp_walls[@]}" | median)
m_med=$(printf '%s\n' "${m_walls[@]}" | median)
cp_rss_med=$(mib "$(printf '%s\n' "${cp_rss[@]}" | median)")
m_rss_med=$(mib "$(printf '%s\n' "${m_rss[@]}" | median)")
ratio=$(awk -v m="$m_med" -v c="$cp_med" 'BEGIN {if (c > 0) printf "%.2f", m/c; else print "inf"}')
{
    printf '%-6s %12s %12s %12s %12s\n' median "$cp_med" "$cp_rss_med" "$m_med" "$m_rss_med"
    echo
    echo "median wall:  cp -r ${cp_med}s   adapterkit merge ${m_med}s   ratio merge/cp = ${ratio}x"
    echo "median peak RSS:  cp -r ${cp_rss_med} MiB   adapterkit merge ${m_rss_med} MiB"
} | tee -a "$RESULTS"

# ---------------------------------------------------------------------------------------------
# 5. Optional PEFT baseline (one run)
# ---------------------------------------------------------------------------------------------
if [[ -n ${PEFT_PYTHON:-} ]]; then
    [[ -x $PEFT_PYTHON ]] || die "PEFT_PYTHON=$PEFT_PYTHON is not executable"
    "$PEFT_PYTHON" -c 'import torch, transformers, peft' 2>/dev/null \
        || die "PEFT_PYTHON=$PEFT_PYTHON cannot import torch, transformers and peft"
    note "== PEFT baseline (one run) =="
    rm -rf "$OUT_PEFT"
    timed peft "$PEFT_PYTHON" "$REPO/bench/peft_merge.py" "$BASE" "$ADAPTER" "$OUT_PEFT"
    rm -rf "$OUT_PEFT"
    {
        echo "PEFT merge_and_unload + save_pretrained (1 run): ${WALL}s, peak RSS $(mib "$RSS") MiB" \
            "($(awk -v p="$WALL" -v m="$m_med" 'BEGIN {if (m > 0) printf "%.1f", p/m; else print "inf"}')x adapterkit's median wall)"
        grep '^peft_merge:' "$LOGDIR/peft.log" || true
    } | tee -a "$RESULTS"
fi

note ""
note "results written to $RESULTS (command logs in $LOGDIR)"

#!/usr/bin/env bash
# Benchmark: `adapterkit merge` of one adapter per PEFT family vs a plain `cp -r` of the checkpoint.
#
# Usage: bench/families_vs_cp.sh [WORKDIR] [RUNS]
#   WORKDIR  where the random TinyLlama-shaped checkpoint, the adapters and the outputs live
#            (default: ${TMPDIR:-/tmp}/adapterkit-bench, the same layout as merge_vs_cp.sh;
#            needs ~5 GB free)
#   RUNS     timed (cp, merge) pairs per family (default 3)
#
# Environment:
#   BENCH_FAMILIES="lora dora ..."   families to run, in order (default: all of
#                                    lora dora ia3 loha lokr oft boft hra vera fourierft);
#                                    lora is gen_tinyllama.py's WORKDIR/adapter, the others are
#                                    written by gen_family_adapters.py into WORKDIR/adapters/<family>
#   ADAPTERKIT=/path/to/adapterkit   use this binary instead of building target/release/adapterkit
#   ADAPTERKIT_MERGE_ARGS="..."      extra arguments appended to `adapterkit merge` (word-split)
#   BENCH_LAYERS=N                   decoder layers of the generated checkpoint (default 22)
#   BENCH_MERGE_TIMEOUT=S            kill a merge that runs longer than S seconds (default 600); the
#                                    family's row then says TIMEOUT and its remaining runs are skipped
#   BENCH_VERIFY=0                   skip checking the warm-up merge of each family against a numpy
#                                    reference (bench/check_family_merge.py)
#   BENCH_VERIFY_LAYERS=N            layers whose targets that check compares (default 1; the
#                                    untargeted tensors are always compared in full)
#   BENCH_SYNC=0                     do not `sync` (untimed) before each timed command
#   BENCH_TIME_SYNC=1                time `CMD && sync` instead of CMD, for both cp and merge
#
# See bench/README.md for what is measured and the caveats.
set -euo pipefail

die() { printf 'families_vs_cp.sh: error: %s\n' "$*" >&2; exit 1; }
note() { printf '%s\n' "$*" >&2; }

ALL_FAMILIES="lora dora ia3 loha lokr oft boft hra vera fourierft"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKDIR=${1:-${TMPDIR:-/tmp}/adapterkit-bench}
RUNS=${2:-3}
FAMILIES=${BENCH_FAMILIES:-$ALL_FAMILIES}
LAYERS=${BENCH_LAYERS:-22}
SYNC=${BENCH_SYNC:-1}
TIME_SYNC=${BENCH_TIME_SYNC:-0}
VERIFY=${BENCH_VERIFY:-1}
VERIFY_LAYERS=${BENCH_VERIFY_LAYERS:-1}
TIMEOUT=${BENCH_MERGE_TIMEOUT:-600}

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
[[ $LAYERS =~ ^[1-9][0-9]*$ ]] || die "BENCH_LAYERS must be a positive integer, got '$LAYERS'"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "BENCH_MERGE_TIMEOUT must be a positive integer, got '$TIMEOUT'"
[[ $VERIFY_LAYERS =~ ^[1-9][0-9]*$ ]] || die "BENCH_VERIFY_LAYERS must be a positive integer, got '$VERIFY_LAYERS'"
read -r -a FAMS <<<"$FAMILIES"
(( ${#FAMS[@]} > 0 )) || die "BENCH_FAMILIES is empty"
for f in "${FAMS[@]}"; do
    [[ " $ALL_FAMILIES " == *" $f "* ]] || die "unknown family '$f' in BENCH_FAMILIES (known: $ALL_FAMILIES)"
done
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is required (apt-get install time)"
/usr/bin/time -f '%e %M' true 2>/dev/null || die "/usr/bin/time does not accept -f; GNU time is required"
command -v timeout >/dev/null || die "timeout (coreutils) is required"
command -v python3 >/dev/null || die "python3 is required to generate the checkpoint and the adapters"

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
# One benchmark per work dir: two runs would delete each other's outputs (and share the CPUs).
if command -v flock >/dev/null; then
    exec 9>"$WORKDIR/.bench.lock"
    flock -n 9 || die "another benchmark holds $WORKDIR/.bench.lock; wait for it or use another WORKDIR"
fi
BASE=$WORKDIR/base
ADAPTERS=$WORKDIR/adapters
OUT_CP=$WORKDIR/out_cp
OUT_MERGE=$WORKDIR/out_merge
LOGDIR=$WORKDIR/logs
mkdir -p "$LOGDIR"

cleanup_outputs() { rm -rf "$OUT_CP" "$OUT_MERGE"; }
trap cleanup_outputs EXIT
cleanup_outputs

# Bytes of BF16 tensor data of the generated checkpoint (embed + lm_head + final norm + layers).
base_bytes=$(( 2 * (2 * 32000 * 2048 + 2048 + LAYERS * (2*2048*2048 + 2*256*2048 + 3*5632*2048 + 2*2048)) ))
avail_bytes() { echo $(( $(df -Pk "$WORKDIR" | awk 'NR==2 {print $4}') * 1024 )); }

# ---------------------------------------------------------------------------------------------
# 1. The binary (as merge_vs_cp.sh)
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
# 2. The checkpoint (shared with merge_vs_cp.sh) and the family adapters
# ---------------------------------------------------------------------------------------------
generated_layers() {
    [[ -f $WORKDIR/GENERATED.json ]] || { echo none; return; }
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"])' "$WORKDIR/GENERATED.json" \
        2>/dev/null || echo none
}
python3 -c 'import numpy' 2>/dev/null \
    || die "python3 has no numpy: pip install numpy (generation needs only python3 + numpy)"
if [[ $(generated_layers) != "$LAYERS" ]]; then
    need=$(( 2 * base_bytes + 768 * 1024 * 1024 ))
    (( $(avail_bytes) >= need )) || die "not enough free space in $WORKDIR: need ~$(( need >> 20 )) MiB"
    note "== generating a $LAYERS-layer TinyLlama-shaped checkpoint in $WORKDIR (once) =="
    rm -rf "$BASE" "$WORKDIR/adapter" "$ADAPTERS"
    python3 "$REPO/bench/gen_tinyllama.py" "$WORKDIR" --layers "$LAYERS" \
        || die "checkpoint generation failed"
fi
[[ -f $BASE/model.safetensors.index.json && -f $WORKDIR/adapter/adapter_model.safetensors ]] \
    || die "checkpoint in $WORKDIR is incomplete; delete $WORKDIR/GENERATED.json to regenerate"

adapter_dir() { if [[ $1 = lora ]]; then echo "$WORKDIR/adapter"; else echo "$ADAPTERS/$1"; fi; }

# (Re)generate a family adapter when its GENERATED.json is missing or older than the base's or the
# generator's.
stale=()
for f in "${FAMS[@]}"; do
    [[ $f = lora ]] && continue
    m=$ADAPTERS/$f/GENERATED.json
    if [[ ! -f $m || $m -ot $WORKDIR/GENERATED.json || $m -ot $REPO/bench/gen_family_adapters.py ]]; then
        stale+=("$f")
    fi
done
if (( ${#stale[@]} > 0 )); then
    note "== generating adapters: ${stale[*]} =="
    python3 "$REPO/bench/gen_family_adapters.py" "$BASE" "$ADAPTERS" --families "${stale[*]}" \
        || die "adapter generation failed"
fi
need=$(( base_bytes + 512 * 1024 * 1024 ))
(( $(avail_bytes) >= need )) || die "not enough free space in $WORKDIR for one output: need ~$(( need >> 20 )) MiB"

MERGE_EXTRA=()
if [[ -n ${ADAPTERKIT_MERGE_ARGS:-} ]]; then
    read -r -a MERGE_EXTRA <<<"$ADAPTERKIT_MERGE_ARGS"
fi

# ---------------------------------------------------------------------------------------------
# 3. Timing helpers
# ---------------------------------------------------------------------------------------------
# timed NAME CMD...: runs CMD under GNU time (and `timeout`), output to $LOGDIR/NAME.log; sets
# WALL (s), RSS (KiB) and STATUS (ok, timeout or failed). Never exits the script.
timed() {
    local name=$1; shift
    local tf=$LOGDIR/$name.time rc=0
    if [[ $SYNC != 0 ]]; then sync; fi
    if [[ $TIME_SYNC != 0 ]]; then
        # GNU time's %M is then the largest RSS of sh and the command (its waited-for child).
        set -- sh -c '"$@" && sync' sh "$@"
    fi
    # %M is the largest RSS of timeout and its (reaped) child, i.e. the command's.
    /usr/bin/time -f '%e %M' -o "$tf" timeout -k 10 "$TIMEOUT" "$@" >"$LOGDIR/$name.log" 2>&1 || rc=$?
    read -r WALL RSS < <(grep -E '^[0-9.]+ [0-9]+$' "$tf" | tail -n 1) || { WALL=nan; RSS=0; }
    if (( rc == 0 )); then STATUS=ok
    elif (( rc == 124 || rc == 137 )); then STATUS=timeout
    else STATUS=failed
    fi
}
run_cp() {
    rm -rf "$OUT_CP"
    timed "$1" cp -r "$BASE" "$OUT_CP"
    [[ $STATUS = ok ]] || { tail -n 20 "$LOGDIR/$1.log" >&2; die "'cp -r $BASE $OUT_CP' failed ($STATUS)"; }
    rm -rf "$OUT_CP"
}
run_merge() {  # run_merge NAME FAMILY [check]
    local adir
    adir=$(adapter_dir "$2")
    rm -rf "$OUT_MERGE"
    timed "$1" "$BIN" merge "$BASE" "$adir" -o "$OUT_MERGE" "${MERGE_EXTRA[@]}"
    if [[ $STATUS = ok && ${3:-} = check ]]; then
        local n
        n=$(find "$OUT_MERGE" -maxdepth 1 -name '*.safetensors' | wc -l)
        if (( n == 0 )); then
            STATUS=failed; echo "merge exited 0 but wrote no .safetensors into $OUT_MERGE" >>"$LOGDIR/$1.log"
        elif [[ $VERIFY != 0 ]]; then
            if python3 "$REPO/bench/check_family_merge.py" "$BASE" "$adir" "$OUT_MERGE" \
                    --layers "$VERIFY_LAYERS" >"$LOGDIR/$1.check" 2>&1; then
                VERIFIED=$(tail -n 1 "$LOGDIR/$1.check")
            else
                STATUS=wrong; VERIFIED=$(grep -v '^check_family_merge' "$LOGDIR/$1.check" | head -n 1)
            fi
        fi
    fi
    rm -rf "$OUT_MERGE"
}
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) exit 1; if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f", k/1024}'; }
first_error() {  # the first line of a log that looks like an error, else its last line
    { grep -m1 -iE 'error|panic|refus|not supported' "$1" || tail -n 1 "$1"; } | cut -c1-160
}

# ---------------------------------------------------------------------------------------------
# 4. Per family: one untimed warm-up (+ check), then RUNS alternating (cp, merge) pairs
# ---------------------------------------------------------------------------------------------
RESULTS=$WORKDIR/results-families-$(date +%Y%m%d-%H%M%S).txt
{
    echo "adapterkit merge (one adapter per PEFT family) vs cp -r  ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo "binary:   $BIN ($("$BIN" --version 2>/dev/null || echo 'version unknown'), built $(date -u -r "$BIN" +%Y-%m-%dT%H:%M:%SZ))"
    echo "repo:     $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (dirty)')$([[ -n ${ADAPTERKIT:-} ]] && echo ' (ADAPTERKIT set: the binary may come from another commit)')"
    echo "machine:  $(nproc) CPUs, $(free -m | awk '/^Mem:/ {print $2}') MiB RAM, $(uname -sr)"
    echo "workdir:  $WORKDIR ($(df -PT "$WORKDIR" | awk 'NR==2 {print $2 " on " $1}'))"
    echo "base:     $LAYERS layers, $(( base_bytes >> 20 )) MiB BF16 in $(find "$BASE" -maxdepth 1 -name '*.safetensors' | wc -l) shard(s)"
    echo "merge:    $BIN merge BASE ADAPTER -o OUT ${MERGE_EXTRA[*]}  (killed after ${TIMEOUT}s)"
    echo "runs:     $RUNS pairs per family (after one untimed warm-up merge; sync before each: $([[ $SYNC != 0 ]] && echo yes || echo no);" \
         "sync inside the timing: $([[ $TIME_SYNC != 0 ]] && echo yes || echo no))"
    echo "verify:   $([[ $VERIFY != 0 ]] && echo "warm-up output vs numpy reference, targets of the first $VERIFY_LAYERS layer(s)" || echo no)"
    echo
} | tee "$RESULTS"

note "== warm-up cp (untimed) =="
run_cp warmup-cp

ROWS=()
for fam in "${FAMS[@]}"; do
    adir=$(adapter_dir "$fam")
    ptype=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c["peft_type"] + ("+DoRA" if c.get("use_dora") else ""))' \
        "$adir/adapter_config.json" 2>/dev/null || echo '?')
    asize=$(awk -v b="$(stat -c %s "$adir/adapter_model.safetensors")" 'BEGIN {printf "%.1f", b/1048576}')
    note "== $fam ($ptype, adapter $asize MiB) =="
    VERIFIED=""
    run_merge "$fam-warmup" "$fam" check
    wu_wall=$WALL wu_rss=$RSS
    if [[ $STATUS != ok ]]; then
        case $STATUS in
            timeout) detail="TIMEOUT: warm-up merge killed after ${wu_wall}s (limit ${TIMEOUT}s), peak RSS $(mib "$wu_rss") MiB" ;;
            wrong)   detail="WRONG: $VERIFIED" ;;
            *)       detail="FAILED: $(first_error "$LOGDIR/$fam-warmup.log")" ;;
        esac
        note "   $detail"
        echo "$fam: $detail" >>"$RESULTS"
        ROWS+=("$(printf '%-10s %-10s %9s %9s %9s %8s %10s  %s' "$fam" "$ptype" "$asize" - - - - "$detail")")
        continue
    fi
    [[ -n $VERIFIED ]] && note "   $VERIFIED" && echo "$fam: $VERIFIED" >>"$RESULTS"
    cp_walls=() cp_rss=() m_walls=() m_rss=() status=ok
    for (( i = 1; i <= RUNS; i++ )); do
        run_cp "$fam-cp-$i";            cp_walls+=("$WALL"); cp_rss+=("$RSS")
        run_merge "$fam-merge-$i" "$fam"
        if [[ $STATUS != ok ]]; then
            status="$STATUS in run $i after ${WALL}s: $(first_error "$LOGDIR/$fam-merge-$i.log")"
            note "   $status"; echo "$fam: $status" >>"$RESULTS"
            break
        fi
        m_walls+=("$WALL"); m_rss+=("$RSS")
        line=$(printf '%-10s run %-2d  cp %7ss %6s MiB   merge %7ss %6s MiB' "$fam" "$i" \
            "${cp_walls[-1]}" "$(mib "${cp_rss[-1]}")" "${m_walls[-1]}" "$(mib "${m_rss[-1]}")")
        note "   $line"; echo "$line" >>"$RESULTS"
    done
    if (( ${#m_walls[@]} == 0 )); then
        ROWS+=("$(printf '%-10s %-10s %9s %9s %9s %8s %10s  %s' "$fam" "$ptype" "$asize" - - - - "$status")")
        continue
    fi
    cp_med=$(printf '%s\n' "${cp_walls[@]}" | median)
    m_med=$(printf '%s\n' "${m_walls[@]}" | median)
    m_rss_med=$(mib "$(printf '%s\n' "${m_rss[@]}" | median)")
    ratio=$(awk -v m="$m_med" -v c="$cp_med" 'BEGIN {if (c > 0) printf "%.2f", m/c; else print "inf"}')
    [[ $status = ok ]] && status="${#m_walls[@]} runs" || status="$status"
    ROWS+=("$(printf '%-10s %-10s %9s %9s %9s %8s %10s  %s' "$fam" "$ptype" "$asize" "$cp_med" "$m_med" "${ratio}x" "$m_rss_med" "$status")")
done

{
    echo
    printf '%-10s %-10s %9s %9s %9s %8s %10s  %s\n' family peft_type adapt_MiB cp_s merge_s merge/cp merge_MiB notes
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "cp_s, merge_s: median wall time; merge_MiB: median peak RSS of the merge (cp's is ~2 MiB)"
} | tee -a "$RESULTS"

note ""
note "results written to $RESULTS (command logs in $LOGDIR)"

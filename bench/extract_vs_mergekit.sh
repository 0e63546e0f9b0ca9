#!/usr/bin/env bash
# Benchmark: LoRA extraction from a fine-tune, `adapterkit extract` vs `mergekit-extract-lora`,
# with a plain `cp -r` of the fine-tuned checkpoint as the floor.
#
# Usage: bench/extract_vs_mergekit.sh [WORKDIR] [RUNS]
#   WORKDIR  where the random TinyLlama-shaped base, the fine-tune and the outputs live
#            (default: ${TMPDIR:-/tmp}/adapterkit-bench, the same base as merge_vs_cp.sh;
#            needs ~5 GB free besides the base)
#   RUNS     timed runs of `adapterkit extract` and of `cp -r` (default 3)
#
# Environment:
#   RUNS_MERGEKIT=N                  timed runs of mergekit-extract-lora (default 1; 8-12 min
#                                    each on 2 cores at 22 layers; 0 skips mergekit)
#   MERGEKIT_VENV=DIR                venv holding mergekit (default ~/.cache/adapterkit-mergekit/venv);
#                                    see bench/requirements-mergekit.txt and bench/README.md
#   MERGEKIT_INSTALL=1               create that venv and install bench/requirements-mergekit.txt when
#                                    it is missing (about 6 GB: PyPI's torch is the CUDA build)
#   MERGEKIT_ARGS="..."              extra arguments for mergekit-extract-lora (word-split)
#   ADAPTERKIT=/path/to/adapterkit   use this binary instead of building target/release/adapterkit;
#                                    ADAPTERKIT=none skips adapterkit (no build)
#   ADAPTERKIT_EXTRACT_ARGS="..."    extra arguments for `adapterkit extract` (word-split)
#   EXTRACT_RANK=R                   LoRA rank asked of both tools (default 64)
#   BENCH_LAYERS=N                   decoder layers of the generated base (default 22); the base is
#                                    generated only when WORKDIR/GENERATED.json is missing or differs
#   BENCH_VERIFY=0                   skip bench/check_extract.py on the first output of each tool
#   BENCH_SYNC=0                     do not `sync` (untimed) before each timed command
#   ADAPTERKIT_TIMEOUT=S             kill an adapterkit run after S seconds (default 1800)
#   MERGEKIT_TIMEOUT=S               kill a mergekit run after S seconds (default 3600)
#   BENCH_RESULTS_DIR=DIR            where the results file goes (default bench/results)
#
# The last output of each tool is kept in WORKDIR/extract-adapterkit and WORKDIR/extract-mergekit.
# See bench/README.md ("Extraction: adapterkit extract vs mergekit-extract-lora") for what is
# measured and the caveats.
set -euo pipefail

die() { printf 'extract_vs_mergekit.sh: error: %s\n' "$*" >&2; exit 1; }
note() { printf '%s\n' "$*" >&2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKDIR=${1:-${TMPDIR:-/tmp}/adapterkit-bench}
RUNS=${2:-3}
RUNS_MK=${RUNS_MERGEKIT:-1}
RANK=${EXTRACT_RANK:-64}
LAYERS=${BENCH_LAYERS:-22}
SYNC=${BENCH_SYNC:-1}
VERIFY=${BENCH_VERIFY:-1}
AK_TIMEOUT=${ADAPTERKIT_TIMEOUT:-1800}
MK_TIMEOUT=${MERGEKIT_TIMEOUT:-3600}
MK_VENV=${MERGEKIT_VENV:-$HOME/.cache/adapterkit-mergekit/venv}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$REPO/bench/results}

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
[[ $RUNS_MK =~ ^[0-9]+$ ]] || die "RUNS_MERGEKIT must be a non-negative integer, got '$RUNS_MK'"
[[ $RANK =~ ^[1-9][0-9]*$ ]] || die "EXTRACT_RANK must be a positive integer, got '$RANK'"
[[ $LAYERS =~ ^[1-9][0-9]*$ ]] || die "BENCH_LAYERS must be a positive integer, got '$LAYERS'"
[[ $AK_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "ADAPTERKIT_TIMEOUT must be a positive integer"
[[ $MK_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "MERGEKIT_TIMEOUT must be a positive integer"
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is required (apt-get install time)"
/usr/bin/time -f '%e %M' true 2>/dev/null || die "/usr/bin/time does not accept -f; GNU time is required"
command -v timeout >/dev/null || die "timeout (coreutils) is required"
command -v python3 >/dev/null || die "python3 is required"
python3 -c 'import numpy' 2>/dev/null \
    || die "python3 has no numpy: pip install numpy (the generators and the checker need only python3 + numpy)"

mkdir -p "$WORKDIR" "$RESULTS_DIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
# One benchmark per work dir: two runs would delete each other's outputs (and share the CPUs).
if command -v flock >/dev/null; then
    exec 9>"$WORKDIR/.bench.lock"
    flock -n 9 || die "another benchmark holds $WORKDIR/.bench.lock; wait for it or use another WORKDIR"
fi
BASE=$WORKDIR/base
FT=$WORKDIR/finetuned
OUT_CP=$WORKDIR/out_cp
OUT_AK=$WORKDIR/extract-adapterkit
OUT_MK=$WORKDIR/extract-mergekit
LOGDIR=$WORKDIR/logs
mkdir -p "$LOGDIR"
trap 'rm -rf "$OUT_CP"' EXIT
rm -rf "$OUT_CP"

base_bytes=$(( 2 * (2 * 32000 * 2048 + 2048 + LAYERS * (2*2048*2048 + 2*256*2048 + 3*5632*2048 + 2*2048)) ))
avail_bytes() { echo $(( $(df -Pk "$WORKDIR" | awk 'NR==2 {print $4}') * 1024 )); }

# ---------------------------------------------------------------------------------------------
# 1. The tools (resolved first, so a missing tool fails before the slow generation)
# ---------------------------------------------------------------------------------------------
BIN='' AK_SKIP=''
if [[ ${ADAPTERKIT:-} = none ]]; then
    AK_SKIP="ADAPTERKIT=none"
elif [[ -n ${ADAPTERKIT:-} ]]; then
    BIN=$ADAPTERKIT
    [[ -x $BIN ]] || die "ADAPTERKIT=$BIN is not an executable file"
else
    command -v cargo >/dev/null || die "cargo not found; install Rust, set ADAPTERKIT=/path/to/adapterkit or ADAPTERKIT=none"
    note "== cargo build --release -p adapterkit-cli =="
    (cd "$REPO" && cargo build --release -p adapterkit-cli) \
        || die "cargo build --release -p adapterkit-cli failed (ADAPTERKIT=none runs mergekit and cp only)"
    target=${CARGO_TARGET_DIR:-$REPO/target}
    [[ $target = /* ]] || target=$REPO/$target
    BIN=$target/release/adapterkit
    [[ -x $BIN ]] || die "build succeeded but $BIN does not exist (is the CLI's binary named 'adapterkit'?)"
fi
if [[ -n $BIN ]] && ! "$BIN" extract --help >/dev/null 2>&1; then
    AK_SKIP="'$BIN extract --help' failed: this adapterkit ($("$BIN" --version 2>/dev/null || echo 'version unknown')) has no 'extract' subcommand yet"
    note "== SKIPPING adapterkit: $AK_SKIP =="
fi

MK=$MK_VENV/bin/mergekit-extract-lora
if (( RUNS_MK > 0 )) && [[ ! -x $MK ]]; then
    if [[ ${MERGEKIT_INSTALL:-0} != 0 ]]; then
        note "== creating $MK_VENV and installing bench/requirements-mergekit.txt (about 6 GB) =="
        python3 -m venv "$MK_VENV" || die "python3 -m venv $MK_VENV failed"
        "$MK_VENV/bin/pip" install -r "$REPO/bench/requirements-mergekit.txt" || die "pip install of mergekit failed"
    fi
    [[ -x $MK ]] || die "$MK not found: python3 -m venv $MK_VENV && $MK_VENV/bin/pip install -r bench/requirements-mergekit.txt (or MERGEKIT_INSTALL=1, or RUNS_MERGEKIT=0 to skip mergekit)"
fi
MK_VERSION=
if (( RUNS_MK > 0 )); then
    MK_VERSION=$("$MK_VENV/bin/python" -c 'import importlib.metadata as m, torch
print("mergekit", m.version("mergekit"), "torch", torch.__version__, "transformers", m.version("transformers"),
      "safetensors", m.version("safetensors"), "(torch threads:", str(torch.get_num_threads()) + ")")' 2>/dev/null) \
        || die "$MK_VENV/bin/python cannot import mergekit and torch"
fi

# ---------------------------------------------------------------------------------------------
# 2. The base (shared with merge_vs_cp.sh) and the fine-tune
# ---------------------------------------------------------------------------------------------
generated_layers() {
    [[ -f $WORKDIR/GENERATED.json ]] || { echo none; return; }
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"])' "$WORKDIR/GENERATED.json" \
        2>/dev/null || echo none
}
if [[ $(generated_layers) != "$LAYERS" ]]; then
    need=$(( 3 * base_bytes + 1024 * 1024 * 1024 ))
    (( $(avail_bytes) >= need )) || die "not enough free space in $WORKDIR: need ~$(( need >> 20 )) MiB"
    note "== generating a $LAYERS-layer TinyLlama-shaped checkpoint in $WORKDIR (once) =="
    rm -rf "$BASE" "$WORKDIR/adapter" "$WORKDIR/adapters" "$FT"
    python3 "$REPO/bench/gen_tinyllama.py" "$WORKDIR" --layers "$LAYERS" || die "checkpoint generation failed"
fi
[[ -f $BASE/model.safetensors.index.json ]] \
    || die "checkpoint in $WORKDIR is incomplete; delete $WORKDIR/GENERATED.json to regenerate"
m=$FT/GENERATED.json
if [[ ! -f $m || $m -ot $WORKDIR/GENERATED.json || $m -ot $REPO/bench/gen_finetune.py ]]; then
    need=$(( 2 * base_bytes + 1024 * 1024 * 1024 ))
    (( $(avail_bytes) >= need )) || die "not enough free space in $WORKDIR: need ~$(( need >> 20 )) MiB"
    note "== generating the fine-tune in $FT (about 1 min) =="
    python3 "$REPO/bench/gen_finetune.py" "$BASE" "$FT" || die "fine-tune generation failed"
fi
need=$(( base_bytes + 1024 * 1024 * 1024 ))
(( $(avail_bytes) >= need )) || die "not enough free space in $WORKDIR for the outputs: need ~$(( need >> 20 )) MiB"

AK_EXTRA=() MK_EXTRA=()
[[ -n ${ADAPTERKIT_EXTRACT_ARGS:-} ]] && read -r -a AK_EXTRA <<<"$ADAPTERKIT_EXTRACT_ARGS"
[[ -n ${MERGEKIT_ARGS:-} ]] && read -r -a MK_EXTRA <<<"$MERGEKIT_ARGS"
AK_CMD=("$BIN" extract "$BASE" "$FT" -o "$OUT_AK" --rank "$RANK" "${AK_EXTRA[@]}")
# HF_HUB_OFFLINE: everything is local; never let transformers try the hub.
MK_CMD=(env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
        "$MK" --model "$FT" --base-model "$BASE" --out-path "$OUT_MK" --max-rank "$RANK" --device cpu
        "${MK_EXTRA[@]}")

# ---------------------------------------------------------------------------------------------
# 3. Timing helpers
# ---------------------------------------------------------------------------------------------
# timed NAME TIMEOUT CMD...: runs CMD under GNU time and `timeout`, output to $LOGDIR/NAME.log;
# sets WALL (s), RSS (KiB), CPU (user+sys s) and STATUS (ok, timeout or failed). Never exits.
timed() {
    local name=$1 limit=$2; shift 2
    local tf=$LOGDIR/$name.time rc=0 busy0 busy1
    if [[ $SYNC != 0 ]]; then sync; fi
    busy0=$(busy_ticks)
    # %M is the largest RSS of timeout and its (reaped) child, i.e. the command's.
    /usr/bin/time -f '%e %M %U %S' -o "$tf" timeout -k 10 "$limit" "$@" >"$LOGDIR/$name.log" 2>&1 || rc=$?
    busy1=$(busy_ticks)
    if read -r WALL RSS usr sys < <(grep -E '^[0-9.]+ [0-9]+ [0-9.]+ [0-9.]+$' "$tf" | tail -n 1); then
        CPU=$(awk -v u="$usr" -v s="$sys" 'BEGIN {printf "%.1f", u + s}')
        # CPU time the rest of the machine used meanwhile, in cores on average (contention).
        OTHER=$(awk -v b="$(( busy1 - busy0 ))" -v hz="$HZ" -v c="$CPU" -v w="$WALL" \
            'BEGIN {o = b / hz - c; if (o < 0) o = 0; if (w > 0) printf "%.2f", o / w; else print "nan"}')
    else
        WALL=nan RSS=0 CPU=nan OTHER=nan
    fi
    if (( rc == 0 )); then STATUS=ok
    elif (( rc == 124 || rc == 137 )); then STATUS=timeout
    else STATUS=failed
    fi
}
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
# Busy CPU ticks of the whole machine so far (user nice system irq softirq steal of /proc/stat).
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) exit 1; if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'; }
minmax() { sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {print lo, hi}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f", k/1024}'; }
first_error() { { grep -m1 -iE 'error|panic|traceback|refus' "$1" || tail -n 1 "$1"; } | cut -c1-160; }
# check_output NAME DIR: check_extract.py on DIR; sets CHECK to its summary line; STATUS=wrong on failure.
check_output() {
    CHECK="not checked (BENCH_VERIFY=0)"
    [[ $VERIFY != 0 ]] || return 0
    if python3 "$REPO/bench/check_extract.py" "$2" "$BASE" "$FT" >"$LOGDIR/$1.check" 2>&1; then
        CHECK=$(tail -n 1 "$LOGDIR/$1.check")
    else
        STATUS=wrong; CHECK=$(tail -n 1 "$LOGDIR/$1.check")
    fi
}

RESULTS=$RESULTS_DIR/extract-$(date +%Y%m%d-%H%M%S).txt
{
    echo "LoRA extraction: adapterkit extract vs mergekit-extract-lora vs cp -r  ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo "repo:       $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "machine:    $(nproc) CPUs, $(free -m | awk '/^Mem:/ {print $2}') MiB RAM, $(uname -sr); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "workdir:    $WORKDIR ($(df -PT "$WORKDIR" | awk 'NR==2 {print $2 " on " $1}'))"
    echo "base:       $LAYERS layers, $(( base_bytes >> 20 )) MiB BF16 in $(find "$BASE" -maxdepth 1 -name '*.safetensors' | wc -l) shard(s)"
    echo "finetuned:  $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))
print("rank-%(rank)s delta (stored ||dW||/||W|| %(stored_rel_delta_min)s..%(stored_rel_delta_max)s, noise %(noise)s), norms std %(norm_std)s, seed %(seed)s" % d)' "$FT/GENERATED.json")"
    if [[ -n $AK_SKIP ]]; then
        echo "adapterkit: SKIPPED: $AK_SKIP"
    else
        echo "adapterkit: $BIN ($("$BIN" --version 2>/dev/null || echo 'version unknown')), $RUNS run(s): ${AK_CMD[*]}" \
             "(killed after ${AK_TIMEOUT}s)"
    fi
    if (( RUNS_MK > 0 )); then
        echo "mergekit:   $MK_VERSION, $RUNS_MK run(s): ${MK_CMD[*]} (killed after ${MK_TIMEOUT}s)"
    else
        echo "mergekit:   SKIPPED (RUNS_MERGEKIT=0)"
    fi
    echo "floor:      cp -r FINETUNED OUT, $RUNS run(s)"
    echo "timing:     /usr/bin/time -f '%e %M %U %S' (wall s, peak RSS KiB, user s, sys s); sync before each: $([[ $SYNC != 0 ]] && echo yes || echo no);" \
         "base and fine-tune read once and one cp -r (untimed) first, so every tool reads them from the page cache"
} | tee "$RESULTS"

# ---------------------------------------------------------------------------------------------
# 4. Runs: page-cache warm-up, then cp and adapterkit alternating, then mergekit
# ---------------------------------------------------------------------------------------------
note "== reading base and fine-tune once, and one cp -r (untimed) =="
cat "$BASE"/*.safetensors "$FT"/*.safetensors >/dev/null
# The first cp -r after a while took ~5 s of CPU instead of ~0.5 s on the development VM; keep it
# out of the timings, as merge_vs_cp.sh does with its warm-up.
timed extract-cp-warmup 600 cp -r "$FT" "$OUT_CP"
[[ $STATUS = ok ]] || { tail -n 20 "$LOGDIR/extract-cp-warmup.log" >&2; die "'cp -r $FT $OUT_CP' failed ($STATUS)"; }
rm -rf "$OUT_CP"

declare -A WALLS RSSS CPUS
WALLS=() RSSS=() CPUS=()
record() { WALLS[$1]+="$WALL "; RSSS[$1]+="$RSS "; CPUS[$1]+="$CPU "; }
AK_STATUS=ok MK_STATUS=ok
[[ -n $AK_SKIP ]] && AK_STATUS=skipped
(( RUNS_MK > 0 )) || MK_STATUS=skipped

echo | tee -a "$RESULTS"
for (( i = 1; i <= RUNS; i++ )); do
    rm -rf "$OUT_CP"
    timed "extract-cp-$i" 600 cp -r "$FT" "$OUT_CP"
    [[ $STATUS = ok ]] || { tail -n 20 "$LOGDIR/extract-cp-$i.log" >&2; die "'cp -r $FT $OUT_CP' failed ($STATUS)"; }
    rm -rf "$OUT_CP"
    record cp
    printf 'run %-2d cp -r        %8.2fs %7s MiB %8s s cpu  (others: %s cores)\n' "$i" "$WALL" "$(mib "$RSS")" "$CPU" "$OTHER" | tee -a "$RESULTS"
    if [[ $AK_STATUS = ok ]]; then
        rm -rf "$OUT_AK"
        timed "extract-adapterkit-$i" "$AK_TIMEOUT" "${AK_CMD[@]}"
        if [[ $STATUS = ok ]] && ! find "$OUT_AK" -maxdepth 1 -name '*.safetensors' 2>/dev/null | grep -q .; then
            STATUS=failed; echo "exited 0 but wrote no .safetensors into $OUT_AK" >>"$LOGDIR/extract-adapterkit-$i.log"
        fi
        if [[ $STATUS = ok ]]; then
            record adapterkit
            printf 'run %-2d adapterkit   %8.2fs %7s MiB %8s s cpu  (others: %s cores)\n' "$i" "$WALL" "$(mib "$RSS")" "$CPU" "$OTHER" | tee -a "$RESULTS"
            if (( i == 1 )); then
                check_output extract-adapterkit-1 "$OUT_AK"
                AK_STATUS=$STATUS
                echo "adapterkit output check: $CHECK" | tee -a "$RESULTS"
                [[ $AK_STATUS = ok ]] || sed 's/^/    /' "$LOGDIR/extract-adapterkit-1.check" | tee -a "$RESULTS"
            fi
        else
            AK_STATUS=$STATUS
            echo "run $i adapterkit   ${STATUS^^} after ${WALL}s: $(first_error "$LOGDIR/extract-adapterkit-$i.log")" \
                "(log: $LOGDIR/extract-adapterkit-$i.log); remaining adapterkit runs skipped" | tee -a "$RESULTS"
        fi
    fi
done

for (( i = 1; i <= RUNS_MK; i++ )); do
    note "== mergekit-extract-lora run $i of $RUNS_MK (8-12 min on 2 cores at 22 layers) =="
    rm -rf "$OUT_MK"
    timed "extract-mergekit-$i" "$MK_TIMEOUT" "${MK_CMD[@]}"
    if [[ $STATUS != ok ]]; then
        MK_STATUS=$STATUS
        echo "run $i mergekit     ${STATUS^^} after ${WALL}s: $(first_error "$LOGDIR/extract-mergekit-$i.log")" \
            "(log: $LOGDIR/extract-mergekit-$i.log); remaining mergekit runs skipped" | tee -a "$RESULTS"
        break
    fi
    record mergekit
    printf 'run %-2d mergekit     %8.2fs %7s MiB %8s s cpu  (others: %s cores)\n' "$i" "$WALL" "$(mib "$RSS")" "$CPU" "$OTHER" | tee -a "$RESULTS"
    if (( i == 1 )); then
        check_output extract-mergekit-1 "$OUT_MK"
        MK_STATUS=$STATUS
        echo "mergekit output check: $CHECK" | tee -a "$RESULTS"
        [[ $MK_STATUS = ok ]] || sed 's/^/    /' "$LOGDIR/extract-mergekit-1.check" | tee -a "$RESULTS"
    fi
done

# ---------------------------------------------------------------------------------------------
# 5. Summary
# ---------------------------------------------------------------------------------------------
summary_row() {  # summary_row LABEL KEY STATUS
    local label=$1 key=$2 status=$3 w r c
    if [[ -z ${WALLS[$key]:-} ]]; then
        printf '%-11s %s\n' "$label" "${status^^}"
        return
    fi
    w=$(tr ' ' '\n' <<<"${WALLS[$key]}" | grep . )
    r=$(tr ' ' '\n' <<<"${RSSS[$key]}" | grep . )
    c=$(tr ' ' '\n' <<<"${CPUS[$key]}" | grep . )
    read -r wmin wmax < <(minmax <<<"$w")
    read -r _ rmax < <(minmax <<<"$r")
    printf '%-11s %4d %9s %9s %9s %9s %9s %9s%s\n' "$label" "$(wc -l <<<"$w")" "$(median <<<"$w")" "$wmin" "$wmax" \
        "$(mib "$(median <<<"$r")")" "$(mib "$rmax")" "$(median <<<"$c")" \
        "$([[ $status = ok ]] || echo "  (${status^^})")"
}
med_of() { [[ -n ${WALLS[$1]:-} ]] && tr ' ' '\n' <<<"${WALLS[$1]}" | grep . | median; }
rss_of() { [[ -n ${RSSS[$1]:-} ]] && tr ' ' '\n' <<<"${RSSS[$1]}" | grep . | minmax | awk '{print $2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2fx", a/b; else print "n/a"}'; }
{
    echo
    printf '%-11s %4s %9s %9s %9s %9s %9s %9s\n' tool runs wall_med wall_min wall_max rss_med rss_max cpu_med
    printf '%-11s %4s %9s %9s %9s %9s %9s %9s\n' "" "" s s s MiB MiB s
    summary_row "cp -r" cp ok
    summary_row adapterkit adapterkit "$AK_STATUS"
    summary_row mergekit mergekit "$MK_STATUS"
    echo
    ak=$(med_of adapterkit || true) mk=$(med_of mergekit || true) cpm=$(med_of cp || true)
    if [[ -n $ak && -n $mk ]]; then
        echo "mergekit/adapterkit: wall $(ratio "$mk" "$ak") (median), peak RSS $(ratio "$(rss_of mergekit)" "$(rss_of adapterkit)") (max)"
    else
        echo "mergekit/adapterkit: n/a (adapterkit: $AK_STATUS, mergekit: $MK_STATUS)"
    fi
    [[ -n $ak && -n $cpm ]] && echo "adapterkit/cp: wall $(ratio "$ak" "$cpm") (median)"
    [[ -n $mk && -n $cpm ]] && echo "mergekit/cp:   wall $(ratio "$mk" "$cpm") (median)"
    for d in ${WALLS[adapterkit]:+"$OUT_AK"} ${WALLS[mergekit]:+"$OUT_MK"}; do
        [[ -d $d ]] && echo "kept: $d ($(du -sm "$d" | cut -f1) MiB: $(cd "$d" && ls | tr '\n' ' '))"
    done
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$RESULTS"

note ""
note "results written to $RESULTS (command logs and check outputs in $LOGDIR)"

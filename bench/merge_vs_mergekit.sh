#!/usr/bin/env bash
# Benchmark: a TIES merge of three full fine-tunes into their base,
# `adapterkit merge BASE FT1 FT2 FT3 -o OUT --method ties --density D --weights W1,W2,W3` vs
# mergekit's `mergekit-yaml` running the same TIES recipe, wall time and peak RSS side by side,
# then bench/check_ties.py on the outputs (with each other and with a reference of the merge).
#
# Usage: bench/merge_vs_mergekit.sh [ADAPTERKIT_BIN] [WORKDIR]
#   ADAPTERKIT_BIN  the adapterkit binary (default: $ADAPTERKIT, else target/release/adapterkit,
#                   honouring $CARGO_TARGET_DIR; nothing is built); `none` skips adapterkit
#   WORKDIR         where the base, the three fine-tunes and the outputs live
#                   (default ${TMPDIR:-/tmp}/adapterkit-bench, the base of the other scripts;
#                   needs ~11 GB free besides the base the first time: 3 fine-tunes + 2 outputs)
#
# Environment:
#   RUNS=N                     timed runs of adapterkit (default 3)
#   RUNS_MERGEKIT=N            timed runs of mergekit-yaml (default 1; several minutes each on 2 cores).
#                              Runs alternate: mergekit 1, adapterkit 1, mergekit 2, ... With 0, the
#                              output an earlier run kept in WORKDIR/ties-mergekit (same recipe, newer
#                              than the fine-tunes) is still compared, and its timing is shown,
#                              marked as from that earlier run.
#   TIES_WEIGHTS=W1,W2,W3      weight per fine-tune (default 0.5,0.3,0.2)
#   TIES_DENSITY=D             fraction of each delta kept by magnitude (default 0.5)
#   MERGEKIT_DTYPE=bfloat16    the recipe's `dtype` (default bfloat16: mergekit loads and computes
#                              in BF16); float32 computes in float32 and writes `out_dtype: bfloat16`
#   MERGEKIT_VENV=DIR          venv holding mergekit (default ~/.cache/adapterkit-mergekit/venv);
#                              see bench/requirements-mergekit.txt
#   MERGEKIT_ARGS="..."        extra arguments for mergekit-yaml (word-split)
#   ADAPTERKIT_TIES_ARGS="..." replaces adapterkit's `--method ties --density D --weights W1,W2,W3`
#                              (word-split), should the option names differ
#   ADAPTERKIT_MERGE_ARGS="..." extra arguments for `adapterkit merge` (word-split)
#   ADAPTERKIT_TIMEOUT=S       kill an adapterkit run after S seconds (default 1800)
#   MERGEKIT_TIMEOUT=S         kill a mergekit run after S seconds (default 3600)
#   BENCH_LAYERS=N             decoder layers of the generated base (default 22)
#   BENCH_VERIFY=0             skip bench/check_ties.py
#   BENCH_REF_LAYERS=L         layers check_ties.py compares with its reference (default all; e.g. 0,21)
#   BENCH_SYNC=0               do not `sync` (untimed) before each timed command
#   BENCH_RESULTS_DIR=DIR      where the results file goes (default bench/results)
#
# The fine-tunes are WORKDIR/ft1..ft3, written by
#   python3 bench/gen_finetune.py BASE WORKDIR/ftS --seed S --noise 0.005 --untouched 0.1   (S = 1, 2, 3)
# unless ftS/GENERATED.json has these parameters and is newer than the base and the generator.
# The last output of each tool is kept in WORKDIR/ties-adapterkit and WORKDIR/ties-mergekit.
# See bench/README.md ("TIES: adapterkit merge --method ties vs mergekit-yaml").
set -euo pipefail

die() { printf 'merge_vs_mergekit.sh: error: %s\n' "$*" >&2; exit 1; }
note() { printf '%s\n' "$*" >&2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_ARG=${1:-${ADAPTERKIT:-}}
WORKDIR=${2:-${TMPDIR:-/tmp}/adapterkit-bench}
RUNS=${RUNS:-3}
RUNS_MK=${RUNS_MERGEKIT:-1}
WEIGHTS=${TIES_WEIGHTS:-0.5,0.3,0.2}
DENSITY=${TIES_DENSITY:-0.5}
MK_DTYPE=${MERGEKIT_DTYPE:-bfloat16}
LAYERS=${BENCH_LAYERS:-22}
SYNC=${BENCH_SYNC:-1}
VERIFY=${BENCH_VERIFY:-1}
REF_LAYERS=${BENCH_REF_LAYERS:-all}
AK_TIMEOUT=${ADAPTERKIT_TIMEOUT:-1800}
MK_TIMEOUT=${MERGEKIT_TIMEOUT:-3600}
MK_VENV=${MERGEKIT_VENV:-$HOME/.cache/adapterkit-mergekit/venv}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$REPO/bench/results}
FT_SEEDS=(1 2 3)
FT_NOISE=0.005
FT_UNTOUCHED=0.1

[[ $RUNS =~ ^[0-9]+$ ]] || die "RUNS must be a non-negative integer, got '$RUNS'"
[[ $RUNS_MK =~ ^[0-9]+$ ]] || die "RUNS_MERGEKIT must be a non-negative integer, got '$RUNS_MK'"
[[ $LAYERS =~ ^[1-9][0-9]*$ ]] || die "BENCH_LAYERS must be a positive integer, got '$LAYERS'"
[[ $AK_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "ADAPTERKIT_TIMEOUT must be a positive integer"
[[ $MK_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "MERGEKIT_TIMEOUT must be a positive integer"
[[ $DENSITY =~ ^(0(\.[0-9]+)?|1(\.0*)?|\.[0-9]+)$ ]] || die "TIES_DENSITY must be a number in [0, 1], got '$DENSITY'"
IFS=, read -r -a W <<<"$WEIGHTS"
(( ${#W[@]} == ${#FT_SEEDS[@]} )) || die "TIES_WEIGHTS needs ${#FT_SEEDS[@]} comma-separated values, got '$WEIGHTS'"
for w in "${W[@]}"; do [[ $w =~ ^-?[0-9]*\.?[0-9]+$ ]] || die "TIES_WEIGHTS: '$w' is not a number"; done
[[ $MK_DTYPE = bfloat16 || $MK_DTYPE = float32 ]] || die "MERGEKIT_DTYPE must be bfloat16 or float32"
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is required (apt-get install time)"
[[ $(/usr/bin/time -v true 2>&1) = *'Maximum resident set size'* ]] || die "/usr/bin/time -v must be GNU time"
command -v timeout >/dev/null || die "timeout (coreutils) is required"
command -v python3 >/dev/null || die "python3 is required"
python3 -c 'import numpy' 2>/dev/null || die "python3 has no numpy: pip install numpy"

mkdir -p "$WORKDIR" "$RESULTS_DIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
# One benchmark per work dir (shared with families_vs_cp.sh and extract_vs_mergekit.sh).
if command -v flock >/dev/null; then
    exec 9>"$WORKDIR/.bench.lock"
    flock -n 9 || die "another benchmark holds $WORKDIR/.bench.lock; wait for it or use another WORKDIR"
fi
BASE=$WORKDIR/base
FTS=() ; for s in "${FT_SEEDS[@]}"; do FTS+=("$WORKDIR/ft$s"); done
OUT_AK=$WORKDIR/ties-adapterkit
OUT_MK=$WORKDIR/ties-mergekit
RECIPE=$WORKDIR/ties-mergekit.yml
MK_TIMING=$WORKDIR/ties-mergekit.timing   # the kept mergekit output's own timing (for RUNS_MERGEKIT=0)
LOGDIR=$WORKDIR/logs
mkdir -p "$LOGDIR"

base_bytes=$(( 2 * (2 * 32000 * 2048 + 2048 + LAYERS * (2*2048*2048 + 2*256*2048 + 3*5632*2048 + 2*2048)) ))
avail_bytes() { echo $(( $(df -Pk "$WORKDIR" | awk 'NR==2 {print $4}') * 1024 )); }

# ---------------------------------------------------------------------------------------------
# 1. The tools (resolved first, so a missing tool fails before the slow generation)
# ---------------------------------------------------------------------------------------------
BIN='' AK_SKIP='' AK_NOTE=''
if [[ $BIN_ARG = none ]]; then
    AK_SKIP="ADAPTERKIT_BIN=none"
else
    if [[ -z $BIN_ARG ]]; then
        target=${CARGO_TARGET_DIR:-$REPO/target}
        [[ $target = /* ]] || target=$REPO/$target
        BIN_ARG=$target/release/adapterkit
    fi
    [[ -x $BIN_ARG ]] || die "$BIN_ARG is not an executable file (build it with cargo build --release -p adapterkit-cli, pass its path, or pass 'none')"
    BIN=$(cd "$(dirname "$BIN_ARG")" && pwd)/$(basename "$BIN_ARG")
    AK_VERSION="$("$BIN" --version 2>/dev/null || echo 'version unknown'), built $(date -u -r "$BIN" +%Y-%m-%dT%H:%M:%SZ)"
    if (( RUNS == 0 )); then
        AK_SKIP="RUNS=0"
    elif [[ $("$BIN" merge --help 2>/dev/null) != *--method* ]]; then
        # Not fatal: the run below shows how it fails, and mergekit is still timed.
        AK_NOTE="'$BIN merge --help' lists no --method: this adapterkit ($AK_VERSION) has no TIES merge yet"
        note "== NOTE: $AK_NOTE; trying once anyway =="
    fi
fi

MK=$MK_VENV/bin/mergekit-yaml
MK_VERSION='' MK_REUSE=''
if (( RUNS_MK > 0 )); then
    [[ -x $MK ]] || die "$MK not found: python3 -m venv $MK_VENV && $MK_VENV/bin/pip install -r bench/requirements-mergekit.txt (or RUNS_MERGEKIT=0)"
    MK_VERSION=$("$MK_VENV/bin/python" -c 'import importlib.metadata as m, torch
print("mergekit", m.version("mergekit"), "torch", torch.__version__, "transformers", m.version("transformers"),
      "safetensors", m.version("safetensors"), "(torch threads:", str(torch.get_num_threads()) + ")")' 2>/dev/null) \
        || die "$MK_VENV/bin/python cannot import mergekit and torch"
fi

# ---------------------------------------------------------------------------------------------
# 2. The base (shared with the other scripts) and the three fine-tunes
# ---------------------------------------------------------------------------------------------
generated_layers() {
    [[ -f $WORKDIR/GENERATED.json ]] || { echo none; return; }
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"])' "$WORKDIR/GENERATED.json" \
        2>/dev/null || echo none
}
if [[ $(generated_layers) != "$LAYERS" ]]; then
    need=$(( 6 * base_bytes + 1024 * 1024 * 1024 ))
    (( $(avail_bytes) >= need )) || die "not enough free space in $WORKDIR: need ~$(( need >> 20 )) MiB"
    note "== generating a $LAYERS-layer TinyLlama-shaped checkpoint in $WORKDIR (once) =="
    rm -rf "$BASE" "$WORKDIR/adapter" "$WORKDIR/adapters" "$WORKDIR/finetuned" "${FTS[@]}" "$OUT_AK" "$OUT_MK" "$MK_TIMING"
    python3 "$REPO/bench/gen_tinyllama.py" "$WORKDIR" --layers "$LAYERS" || die "checkpoint generation failed"
fi
[[ -f $BASE/model.safetensors.index.json ]] \
    || die "checkpoint in $WORKDIR is incomplete; delete $WORKDIR/GENERATED.json to regenerate"
ft_ok() {  # ft_ok DIR SEED: GENERATED.json is there, has our parameters, and is newer than its inputs
    local m=$1/GENERATED.json
    [[ -f $m && ! $m -ot $WORKDIR/GENERATED.json && ! $m -ot $REPO/bench/gen_finetune.py ]] || return 1
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))
sys.exit(0 if (d.get("seed"), d.get("noise"), d.get("untouched")) == (int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])) else 1)' \
        "$m" "$2" "$FT_NOISE" "$FT_UNTOUCHED"
}
for k in "${!FT_SEEDS[@]}"; do
    s=${FT_SEEDS[$k]} d=${FTS[$k]}
    ft_ok "$d" "$s" && continue
    need=$(( base_bytes + 1024 * 1024 * 1024 ))
    (( $(avail_bytes) >= need )) || die "not enough free space in $WORKDIR for $d: need ~$(( need >> 20 )) MiB"
    note "== generating fine-tune $d (seed $s; about 1 min) =="
    rm -rf "$OUT_MK" "$MK_TIMING"   # a kept mergekit output of other inputs is useless
    python3 "$REPO/bench/gen_finetune.py" "$BASE" "$d" --seed "$s" --noise "$FT_NOISE" --untouched "$FT_UNTOUCHED" \
        || die "fine-tune generation failed"
done
# Room for both outputs (the old ones are deleted before each run).
have=0
for d in "$OUT_AK" "$OUT_MK"; do [[ -d $d ]] && have=$(( have + $(du -sk "$d" | cut -f1) * 1024 )); done
need=$(( 2 * base_bytes + 1024 * 1024 * 1024 - have ))
(( $(avail_bytes) >= need )) || die "not enough free space in $WORKDIR for the two outputs: need ~$(( need >> 20 )) MiB more"

# ---------------------------------------------------------------------------------------------
# 3. The recipe and the commands
# ---------------------------------------------------------------------------------------------
{
    echo "merge_method: ties"
    echo "base_model: $BASE"
    echo "models:"
    for k in "${!FTS[@]}"; do
        echo "  - model: ${FTS[$k]}"
        echo "    parameters:"
        echo "      weight: ${W[$k]}"
        echo "      density: $DENSITY"
    done
    if [[ $MK_DTYPE = float32 ]]; then
        echo "dtype: float32"
        echo "out_dtype: bfloat16"
    else
        echo "dtype: bfloat16"
    fi
} >"$RECIPE.new"

AK_EXTRA=() AK_TIES=(--method ties --density "$DENSITY" --weights "$WEIGHTS") MK_EXTRA=()
[[ -n ${ADAPTERKIT_TIES_ARGS:-} ]] && read -r -a AK_TIES <<<"$ADAPTERKIT_TIES_ARGS"
[[ -n ${ADAPTERKIT_MERGE_ARGS:-} ]] && read -r -a AK_EXTRA <<<"$ADAPTERKIT_MERGE_ARGS"
[[ -n ${MERGEKIT_ARGS:-} ]] && read -r -a MK_EXTRA <<<"$MERGEKIT_ARGS"
AK_CMD=("$BIN" merge "$BASE" "${FTS[@]}" -o "$OUT_AK" "${AK_TIES[@]}" "${AK_EXTRA[@]}")
# --lazy-unpickle: mergekit's usual low-memory loading option (a no-op for safetensors inputs).
# --no-copy-tokenizer: the generated base has no tokenizer; by default mergekit-yaml tries to
#   build one from the base after writing the weights and exits 1 (transformers: "Couldn't
#   instantiate the backend tokenizer").
# --out-shard-size is left at its default (5B parameters: one 2.2 GB model.safetensors).
# HF_HUB_OFFLINE etc.: everything is local; never let transformers try the hub.
MK_CMD=(env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
        "$MK" "$RECIPE" "$OUT_MK" --lazy-unpickle --no-copy-tokenizer "${MK_EXTRA[@]}")

# A kept mergekit output can stand in when RUNS_MERGEKIT=0: same recipe, same extra arguments,
# newer than every input.
mk_kept_ok() {
    [[ -f $OUT_MK/mergekit_config.yml && -f $MK_TIMING && -f $RECIPE ]] || return 1
    cmp -s "$RECIPE" "$RECIPE.new" || return 1
    grep -qxF "args ${MK_EXTRA[*]}" "$MK_TIMING" || return 1
    local d
    for d in "${FTS[@]}"; do [[ $OUT_MK -nt $d/GENERATED.json ]] || return 1; done
}
if (( RUNS_MK == 0 )) && mk_kept_ok; then
    MK_REUSE=$(grep '^line ' "$MK_TIMING" | head -n 1 | cut -d' ' -f2-)
fi
if (( RUNS_MK > 0 )) || [[ -z $MK_REUSE ]]; then
    rm -f "$MK_TIMING"
fi
mv "$RECIPE.new" "$RECIPE"

# ---------------------------------------------------------------------------------------------
# 4. Timing helpers
# ---------------------------------------------------------------------------------------------
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
# Busy CPU ticks of the whole machine so far (user nice system irq softirq steal of /proc/stat).
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
# timed NAME TIMEOUT CMD...: runs CMD under `/usr/bin/time -v` and `timeout`, output to
# $LOGDIR/NAME.log and the time report to $LOGDIR/NAME.time; sets WALL (s), RSS (KiB),
# CPU (user+sys s), OTHER (cores the rest of the machine used meanwhile) and STATUS (ok, timeout
# or failed). Never exits.
timed() {
    local name=$1 limit=$2; shift 2
    local tf=$LOGDIR/$name.time rc=0 busy0 busy1 usr sys
    if [[ $SYNC != 0 ]]; then sync; fi
    busy0=$(busy_ticks)
    # The maximum RSS is that of timeout and its (reaped) child, i.e. the command's.
    /usr/bin/time -v -o "$tf" timeout -k 10 "$limit" "$@" >"$LOGDIR/$name.log" 2>&1 || rc=$?
    busy1=$(busy_ticks)
    WALL=$(awk -F': ' '/Elapsed \(wall clock\) time/ {n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s}' "$tf")
    RSS=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tf")
    usr=$(awk -F': ' '/User time \(seconds\)/ {print $2}' "$tf")
    sys=$(awk -F': ' '/System time \(seconds\)/ {print $2}' "$tf")
    if [[ -n $WALL && -n $RSS && -n $usr && -n $sys ]]; then
        CPU=$(awk -v u="$usr" -v s="$sys" 'BEGIN {printf "%.1f", u + s}')
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
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) exit 1; if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'; }
minmax() { sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {print lo, hi}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f", k/1024}'; }
first_error() { { grep -m1 -iE 'error|panic|traceback|refus|unexpected' "$1" || tail -n 1 "$1"; } | cut -c1-200; }
has_safetensors() { compgen -G "$1/*.safetensors" >/dev/null; }

RESULTS=$RESULTS_DIR/ties-$(date +%Y%m%d-%H%M%S).txt
ft_desc() {
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))
print("seed %(seed)s: rank-%(rank)s delta %(delta_min)s..%(delta_max)s of ||W|| + dense noise %(noise)s of ||W||, "
      "%(projections_perturbed)s projections perturbed, %(projections_untouched)s untouched, %(norms_perturbed)s norms perturbed (std %(norm_std)s), "
      "%(copied_bit_identical)s other tensors copied; stored ||dW||/||W|| %(stored_rel_delta_min)s..%(stored_rel_delta_max)s" % d)' "$1/GENERATED.json"
}
{
    echo "TIES merge of 3 fine-tunes: adapterkit merge --method ties vs mergekit-yaml  ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo "repo:       $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "machine:    $(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), $(free -m | awk '/^Mem:/ {print $2}') MiB RAM, $(uname -sr); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "workdir:    $WORKDIR ($(df -PT "$WORKDIR" | awk 'NR==2 {print $2 " on " $1}')), $(( $(avail_bytes) >> 20 )) MiB free before the runs"
    echo "base:       $LAYERS layers, $(( base_bytes >> 20 )) MiB BF16 in $(find "$BASE" -maxdepth 1 -name '*.safetensors' | wc -l) shard(s)"
    for k in "${!FTS[@]}"; do echo "ft$(( k + 1 )):        $(ft_desc "${FTS[$k]}")"; done
    echo "merge:      TIES, weights $WEIGHTS, density $DENSITY"
    if [[ -n $AK_SKIP ]]; then
        echo "adapterkit: SKIPPED ($AK_SKIP)"
    else
        echo "adapterkit: $BIN ($AK_VERSION), $RUNS run(s), killed after ${AK_TIMEOUT}s:"
        echo "    ${AK_CMD[*]}"
        [[ -n $AK_NOTE ]] && echo "    NOTE: $AK_NOTE"
    fi
    if (( RUNS_MK > 0 )); then
        echo "mergekit:   $MK_VERSION, $RUNS_MK run(s), killed after ${MK_TIMEOUT}s:"
        echo "    ${MK_CMD[*]}"
    elif [[ -n $MK_REUSE ]]; then
        echo "mergekit:   not run (RUNS_MERGEKIT=0); $OUT_MK is from an earlier run with the same recipe:"
        sed -n 's/^\(version\|command\|when\) /    \1: /p' "$MK_TIMING"
    else
        echo "mergekit:   SKIPPED (RUNS_MERGEKIT=0, and no kept output of the same recipe in $OUT_MK)"
    fi
    echo "recipe:     $RECIPE"
    sed 's/^/    /' "$RECIPE"
    echo "timing:     /usr/bin/time -v (wall clock, maximum resident set size, user + system time); sync before each: $([[ $SYNC != 0 ]] && echo yes || echo no);" \
         "base and fine-tunes read once (untimed) first, so both tools read them from the page cache; the previous output is deleted before each run"
} | tee "$RESULTS"

# ---------------------------------------------------------------------------------------------
# 5. Runs: page-cache warm-up, then mergekit and adapterkit alternating
# ---------------------------------------------------------------------------------------------
note "== reading the base and the fine-tunes once (untimed) =="
for d in "$BASE" "${FTS[@]}"; do cat "$d"/*.safetensors >/dev/null; done

declare -A WALLS RSSS CPUS
WALLS=() RSSS=() CPUS=()
record() { WALLS[$1]+="$WALL "; RSSS[$1]+="$RSS "; CPUS[$1]+="$CPU "; }
AK_STATUS=ok MK_STATUS=ok
[[ -n $AK_SKIP ]] && AK_STATUS=skipped
(( RUNS_MK > 0 )) || MK_STATUS=skipped
AK_RUNS=$RUNS; [[ -n $AK_SKIP ]] && AK_RUNS=0
N=$(( AK_RUNS > RUNS_MK ? AK_RUNS : RUNS_MK ))
line() { printf 'run %-2d %-11s %8.2fs %7s MiB %8s s cpu  (others: %s cores)\n' "$1" "$2" "$WALL" "$(mib "$RSS")" "$CPU" "$OTHER"; }

echo | tee -a "$RESULTS"
for (( i = 1; i <= N; i++ )); do
    if (( i <= RUNS_MK )) && [[ $MK_STATUS = ok ]]; then
        note "== mergekit-yaml run $i of $RUNS_MK =="
        rm -rf "$OUT_MK" "$MK_TIMING"
        timed "ties-mergekit-$i" "$MK_TIMEOUT" "${MK_CMD[@]}"
        if [[ $STATUS = ok ]] && ! has_safetensors "$OUT_MK"; then
            STATUS=failed; echo "exited 0 but wrote no .safetensors into $OUT_MK" >>"$LOGDIR/ties-mergekit-$i.log"
        fi
        if [[ $STATUS = ok ]]; then
            record mergekit
            line "$i" mergekit | tee -a "$RESULTS"
            {
                echo "line $(line "$i" mergekit)"
                echo "version $MK_VERSION"
                echo "command ${MK_CMD[*]}"
                echo "when $(date -u +%Y-%m-%dT%H:%M:%SZ) (results file $RESULTS)"
                echo "wall $WALL"
                echo "rss $RSS"
                echo "args ${MK_EXTRA[*]}"
            } >"$MK_TIMING"
        else
            MK_STATUS=$STATUS
            echo "run $i mergekit    ${STATUS^^} after ${WALL}s: $(first_error "$LOGDIR/ties-mergekit-$i.log")" \
                "(log: $LOGDIR/ties-mergekit-$i.log); remaining mergekit runs skipped" | tee -a "$RESULTS"
            rm -rf "$OUT_MK"
        fi
    fi
    if (( i <= AK_RUNS )) && [[ $AK_STATUS = ok ]]; then
        note "== adapterkit merge run $i of $AK_RUNS =="
        rm -rf "$OUT_AK"
        timed "ties-adapterkit-$i" "$AK_TIMEOUT" "${AK_CMD[@]}"
        if [[ $STATUS = ok ]] && ! has_safetensors "$OUT_AK"; then
            STATUS=failed; echo "exited 0 but wrote no .safetensors into $OUT_AK" >>"$LOGDIR/ties-adapterkit-$i.log"
        fi
        if [[ $STATUS = ok ]]; then
            record adapterkit
            line "$i" adapterkit | tee -a "$RESULTS"
        else
            AK_STATUS=$STATUS
            echo "run $i adapterkit  ${STATUS^^} after ${WALL}s (exit status $(awk -F': ' '/Exit status/ {print $2}' "$LOGDIR/ties-adapterkit-$i.time")):" \
                "$(first_error "$LOGDIR/ties-adapterkit-$i.log") (log: $LOGDIR/ties-adapterkit-$i.log); remaining adapterkit runs skipped" | tee -a "$RESULTS"
            rm -rf "$OUT_AK"
        fi
    fi
done
if [[ -n $MK_REUSE ]]; then
    echo "earlier  mergekit: ${MK_REUSE#run * mergekit }" | tee -a "$RESULTS"
    WALLS[mergekit]="$(awk '/^wall / {print $2}' "$MK_TIMING") " RSSS[mergekit]="$(awk '/^rss / {print $2}' "$MK_TIMING") "
    CPUS[mergekit]="$(sed -n 's/^line .* \([0-9.]*\) s cpu .*/\1/p' "$MK_TIMING") "
    MK_STATUS=ok
fi

# ---------------------------------------------------------------------------------------------
# 6. Summary
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
        "$([[ $status = ok ]] || echo "  (${status^^})")$([[ $key = mergekit && -n $MK_REUSE ]] && echo '  (earlier run)')"
}
med_of() { [[ -n ${WALLS[$1]:-} ]] && tr ' ' '\n' <<<"${WALLS[$1]}" | grep . | median; }
rssmed_of() { [[ -n ${RSSS[$1]:-} ]] && tr ' ' '\n' <<<"${RSSS[$1]}" | grep . | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2fx", a/b; else print "n/a"}'; }
{
    echo
    printf '%-11s %4s %9s %9s %9s %9s %9s %9s\n' tool runs wall_med wall_min wall_max rss_med rss_max cpu_med
    printf '%-11s %4s %9s %9s %9s %9s %9s %9s\n' "" "" s s s MiB MiB s
    summary_row mergekit mergekit "$MK_STATUS"
    summary_row adapterkit adapterkit "$AK_STATUS"
    echo
    ak=$(med_of adapterkit || true) mk=$(med_of mergekit || true)
    if [[ -n $ak && -n $mk ]]; then
        echo "mergekit/adapterkit: wall $(ratio "$mk" "$ak"), peak RSS $(ratio "$(rssmed_of mergekit)" "$(rssmed_of adapterkit)") (medians)"
    else
        echo "mergekit/adapterkit: n/a (adapterkit: $AK_STATUS, mergekit: $MK_STATUS)"
    fi
} | tee -a "$RESULTS"

# ---------------------------------------------------------------------------------------------
# 7. The outputs: check_ties.py (with each other and with the reference)
# ---------------------------------------------------------------------------------------------
CHECK_OUTS=()
[[ -n ${WALLS[adapterkit]:-} && -d $OUT_AK ]] && CHECK_OUTS+=("adapterkit=$OUT_AK")
[[ -n ${WALLS[mergekit]:-} && -d $OUT_MK ]] && CHECK_OUTS+=("mergekit=$OUT_MK")
CHECK_RC=skipped
if [[ $VERIFY = 0 ]]; then
    echo "check_ties: not run (BENCH_VERIFY=0)" | tee -a "$RESULTS"
elif (( ${#CHECK_OUTS[@]} == 0 )); then
    echo "check_ties: not run (no output to check)" | tee -a "$RESULTS"
else
    note "== bench/check_ties.py ${CHECK_OUTS[*]} (a few minutes at 22 layers) =="
    CHECK_CMD=(python3 "$REPO/bench/check_ties.py" "${CHECK_OUTS[@]}" --base "$BASE" --models "${FTS[@]}"
               --weights "$WEIGHTS" --density "$DENSITY" --ref-layers "$REF_LAYERS" --json "$LOGDIR/ties-check.json")
    CHECK_RC=0
    "${CHECK_CMD[@]}" >"$LOGDIR/ties-check.log" 2>&1 || CHECK_RC=$?
    {
        echo
        echo "check: ${CHECK_CMD[*]}  (exit $CHECK_RC; per-tensor results in $LOGDIR/ties-check.json)"
        sed 's/^/    /' "$LOGDIR/ties-check.log"
    } | tee -a "$RESULTS"
fi

{
    echo
    for d in "$OUT_MK" "$OUT_AK"; do
        [[ -d $d ]] && echo "kept: $d ($(du -sm "$d" | cut -f1) MiB: $(cd "$d" && ls | tr '\n' ' '))"
    done
    echo "disk: $(du -smc "$BASE" "${FTS[@]}" | tail -n 1 | cut -f1) MiB of inputs (base + 3 fine-tunes), $(( $(avail_bytes) >> 20 )) MiB free after"
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$RESULTS"

note ""
note "results written to $RESULTS (command logs in $LOGDIR/ties-*)"

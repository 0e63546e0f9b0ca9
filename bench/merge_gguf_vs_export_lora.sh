#!/usr/bin/env bash
# Benchmark: merging a LoRA into a GGUF model, `adapterkit merge BASE.gguf ADAPTER -o OUT.gguf`
# vs llama.cpp's `llama-export-lora -m BASE.gguf --lora LORA.gguf -o OUT.gguf`, wall time and peak
# RSS side by side, with `cp BASE.gguf X.gguf` as the floor, then bench/check_gguf_merge.py on the
# outputs (tensor by tensor, with each other, with the base, and with a float64 reference).
#
# Usage: bench/merge_gguf_vs_export_lora.sh [ADAPTERKIT_BIN] [WORKDIR]
#   ADAPTERKIT_BIN  the adapterkit binary (default: $ADAPTERKIT, else target/release/adapterkit,
#                   honouring $CARGO_TARGET_DIR; nothing is built)
#   WORKDIR         holds base/ (bench/gen_tinyllama.py's 22-layer BF16 checkpoint) and adapter/
#                   (its rank-16 PEFT LoRA on all 7 linears); default ${TMPDIR:-/tmp}/adapterkit-bench,
#                   the work dir of the other scripts. The GGUF files go to WORKDIR/gguf.
#
# What is timed, per GGUF base type (F16 and Q8_0 by default), RUNS rounds, alternating:
#   export-lora  llama-export-lora -m base_T.gguf --lora lora_f32.gguf -o out.gguf -t THREADS
#   ak-gguf      adapterkit merge base_T.gguf lora_f32.gguf -o out.gguf --threads THREADS
#                (the same GGUF LoRA as export-lora reads)
#   ak-peft      adapterkit merge base_T.gguf WORKDIR/adapter -o out.gguf
#                (the PEFT adapter directly, no convert_lora_to_gguf.py step; default threads,
#                i.e. one per core)
#   cp           cp base_T.gguf out.gguf (the floor: read + write the same bytes)
# Each output is deleted (untimed) after its run, so one output at a time needs room.
#
# Prepared once and cached in WORKDIR/gguf (redone when the base or adapter is newer):
#   base_hf/         symlinks to WORKDIR/base plus a synthetic 32000-piece sentencepiece tokenizer
#                    (bench/make_sp_tokenizer.py): the generated base has none, and
#                    convert_hf_to_gguf.py refuses a model without one
#   base_f16.gguf    convert_hf_to_gguf.py base_hf --outtype f16
#   base_q8_0.gguf   convert_hf_to_gguf.py base_hf --outtype q8_0
#   lora_f32.gguf    convert_lora_to_gguf.py --base base_hf --outtype f32 WORKDIR/adapter
# (their conversion times are kept in *.conv and shown: the export-lora route from a PEFT
# adapter pays convert_lora_to_gguf.py once.)
#
# Environment:
#   RUNS=N                  timed rounds (default 3), after one untimed warm-up of each command
#   BENCH_BASES=f16,q8_0    GGUF base types to time (f16, q8_0, bf16, f32: any convert_hf_to_gguf outtype)
#   BENCH_TOOLS=export-lora,ak-gguf,ak-peft,cp   which commands to time
#   BENCH_THREADS=N         -t / --threads of export-lora and ak-gguf (default 2)
#   LLAMA_CPP=DIR           llama.cpp source tree with build/bin/llama-export-lora
#                           (default ~/.cache/adapterkit-gguf/llama.cpp-src)
#   REFERENCE_PYTHON=PY     python with torch, transformers, sentencepiece, numpy for the converters and
#                           the check (default ~/.cache/adapterkit-reference/venv/bin/python);
#                           gguf-py is taken from LLAMA_CPP/gguf-py
#   BENCH_ADAPTER=DIR       the PEFT LoRA (default WORKDIR/adapter)
#   BENCH_TIMEOUT=S         kill a run after S seconds (default 900)
#   BENCH_WAIT_PATTERN=RE   before timing, wait while `pgrep -f RE` finds processes (default fuzz: the
#                           machine has 2 cores); '' to not wait
#   BENCH_WAIT_MAX=S        wait at most S seconds (default 1500), polling every 30 s; then time anyway
#                           and say so in the results
#   BENCH_VERIFY=0          skip the output check
#   BENCH_CHECKDIR=DIR      where the check writes its three outputs (default /dev/shm when it has room,
#                           else WORKDIR/gguf); they are deleted afterwards
#   BENCH_SYNC=0            do not `sync` (untimed) before each timed command
#   BENCH_RESULTS_DIR=DIR   where the results file goes (default bench/results)
#
# Results: bench/results/gguf-merge-YYYYMMDD-HHMMSS.txt; logs in WORKDIR/logs/gguf-*.
set -euo pipefail

die() { printf 'merge_gguf_vs_export_lora.sh: error: %s\n' "$*" >&2; exit 1; }
note() { printf '%s\n' "$*" >&2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_ARG=${1:-${ADAPTERKIT:-}}
WORKDIR=${2:-${TMPDIR:-/tmp}/adapterkit-bench}
RUNS=${RUNS:-3}
THREADS=${BENCH_THREADS:-2}
LLAMA_CPP=${LLAMA_CPP:-$HOME/.cache/adapterkit-gguf/llama.cpp-src}
PY=${REFERENCE_PYTHON:-$HOME/.cache/adapterkit-reference/venv/bin/python}
TIMEOUT=${BENCH_TIMEOUT:-900}
WAIT_PATTERN=${BENCH_WAIT_PATTERN-fuzz}
WAIT_MAX=${BENCH_WAIT_MAX:-1500}
VERIFY=${BENCH_VERIFY:-1}
SYNC=${BENCH_SYNC:-1}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$REPO/bench/results}
IFS=, read -r -a BASE_TYPES <<<"${BENCH_BASES:-f16,q8_0}"
IFS=, read -r -a TOOLS <<<"${BENCH_TOOLS:-export-lora,ak-gguf,ak-peft,cp}"

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "BENCH_THREADS must be a positive integer, got '$THREADS'"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "BENCH_TIMEOUT must be a positive integer"
[[ $WAIT_MAX =~ ^[0-9]+$ ]] || die "BENCH_WAIT_MAX must be a non-negative integer"
for t in "${BASE_TYPES[@]}"; do [[ $t =~ ^(f16|q8_0|bf16|f32)$ ]] || die "BENCH_BASES: unknown type '$t'"; done
for t in "${TOOLS[@]}"; do [[ $t =~ ^(export-lora|ak-gguf|ak-peft|cp)$ ]] || die "BENCH_TOOLS: unknown command '$t'"; done
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is required (apt-get install time)"
[[ $(/usr/bin/time -v true 2>&1) = *'Maximum resident set size'* ]] || die "/usr/bin/time -v must be GNU time"
command -v timeout >/dev/null || die "timeout (coreutils) is required"

EXPORT_LORA=$LLAMA_CPP/build/bin/llama-export-lora
[[ -x $EXPORT_LORA ]] || die "$EXPORT_LORA not found (set LLAMA_CPP; see fixtures/gguf/README.md for the build)"
[[ -f $LLAMA_CPP/convert_hf_to_gguf.py && -f $LLAMA_CPP/convert_lora_to_gguf.py && -d $LLAMA_CPP/gguf-py ]] \
    || die "$LLAMA_CPP lacks convert_hf_to_gguf.py, convert_lora_to_gguf.py or gguf-py/"
[[ -x $PY ]] || die "$PY not found (set REFERENCE_PYTHON)"
"$PY" -c 'import torch, numpy, sentencepiece, safetensors' 2>/dev/null \
    || die "$PY cannot import torch, numpy, sentencepiece and safetensors"

mkdir -p "$WORKDIR" "$RESULTS_DIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
BASE=$WORKDIR/base
ADAPTER=${BENCH_ADAPTER:-$WORKDIR/adapter}
GG=$WORKDIR/gguf
LOGDIR=$WORKDIR/logs
mkdir -p "$GG" "$LOGDIR"
[[ -f $BASE/config.json ]] && compgen -G "$BASE/*.safetensors" >/dev/null \
    || die "$BASE has no checkpoint: run bench/merge_vs_cp.sh (or python3 bench/gen_tinyllama.py $WORKDIR) first"
[[ -f $ADAPTER/adapter_config.json ]] || die "$ADAPTER has no adapter_config.json"
# One benchmark per work dir (shared with the other scripts).
if command -v flock >/dev/null; then
    exec 9>"$WORKDIR/.bench.lock"
    flock -n 9 || die "another benchmark holds $WORKDIR/.bench.lock; wait for it or use another WORKDIR"
fi

if [[ -z $BIN_ARG ]]; then
    target=${CARGO_TARGET_DIR:-$REPO/target}
    [[ $target = /* ]] || target=$REPO/$target
    BIN_ARG=$target/release/adapterkit
fi
[[ -x $BIN_ARG ]] || die "$BIN_ARG is not an executable file (build it with cargo build --release -p adapterkit-cli, or pass its path)"
BIN=$(cd "$(dirname "$BIN_ARG")" && pwd)/$(basename "$BIN_ARG")
AK_VERSION="$("$BIN" --version 2>/dev/null || echo 'version unknown'), built $(date -u -r "$BIN" +%Y-%m-%dT%H:%M:%SZ)"

avail_bytes() { echo $(( $(df -Pk "$1" | awk 'NR==2 {print $4}') * 1024 )); }
fsize() { stat -c %s "$1"; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# ---------------------------------------------------------------------------------------------
# 1. The GGUF inputs (once; cached in WORKDIR/gguf)
# ---------------------------------------------------------------------------------------------
# conv OUT STAMP_INPUTS... -- CMD...: runs CMD (untimed for the benchmark, but its time and peak
# RSS are kept in OUT.conv) unless OUT exists and is newer than every input.
conv() {
    local out=$1; shift
    local inputs=() fresh=1 i
    while [[ $1 != -- ]]; do inputs+=("$1"); shift; done
    shift
    if [[ -s $out && -f $out.conv ]]; then
        for i in "${inputs[@]}"; do [[ $out -nt $i ]] || fresh=0; done
        grep -qxF "command $*" "$out.conv" || fresh=0
    else
        fresh=0
    fi
    (( fresh )) && return 0
    rm -f "$out" "$out.conv"
    note "== $(basename "$out"): $* =="
    local tf rc=0
    tf=$LOGDIR/gguf-conv-$(basename "$out").time
    /usr/bin/time -v -o "$tf" "$@" >"$LOGDIR/gguf-conv-$(basename "$out").log" 2>&1 || rc=$?
    (( rc == 0 )) && [[ -s $out ]] \
        || die "conversion failed (exit $rc): $* (log: $LOGDIR/gguf-conv-$(basename "$out").log)"
    {
        echo "command $*"
        echo "when $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        awk -F': ' '/Elapsed \(wall clock\) time/ {n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "wall %.2f\n", s}
                    /Maximum resident set size/ {printf "rss_kib %s\n", $2}' "$tf"
        echo "warnings $(grep -c '^WARNING' "$LOGDIR/gguf-conv-$(basename "$out").log" || true): $(grep '^WARNING' "$LOGDIR/gguf-conv-$(basename "$out").log" | sort -u | head -n 3 | tr '\n' ' ')"
    } >"$out.conv"
}
conv_desc() {  # conv_desc OUT: one line from OUT.conv
    awk '/^wall / {w = $2} /^rss_kib / {r = $2} /^when / {t = $2} /^warnings / {sub(/^warnings /, ""); wn = $0}
         END {printf "converted %s in %.1fs, peak RSS %.0f MiB; warnings %s", t, w, r / 1024, wn}' "$1.conv"
}

HF=$GG/base_hf
BASE_STAMP=$BASE/config.json
[[ -f $WORKDIR/GENERATED.json ]] && BASE_STAMP=$WORKDIR/GENERATED.json
if [[ ! -f $HF/tokenizer.model || $HF/tokenizer.model -ot $BASE_STAMP || $HF/tokenizer.model -ot $REPO/bench/make_sp_tokenizer.py ]]; then
    note "== $HF: symlinks to $BASE + a synthetic tokenizer =="
    rm -rf "$HF"; mkdir -p "$HF"
    for f in "$BASE"/*; do ln -s "$f" "$HF/"; done
    "$PY" "$REPO/bench/make_sp_tokenizer.py" "$HF" >&2 || die "make_sp_tokenizer.py failed"
fi

declare -A GBASE
for t in "${BASE_TYPES[@]}"; do
    GBASE[$t]=$GG/base_$t.gguf
    if [[ ! -s ${GBASE[$t]} ]]; then
        need=$(( $(du -sbL "$BASE" | cut -f1) + (1 << 30) ))
        (( $(avail_bytes "$GG") >= need )) || die "not enough free space in $GG for base_$t.gguf: need ~$(( need >> 20 )) MiB"
    fi
    conv "${GBASE[$t]}" "$HF/tokenizer.model" "$BASE_STAMP" "$LLAMA_CPP/convert_hf_to_gguf.py" -- \
        "$PY" "$LLAMA_CPP/convert_hf_to_gguf.py" "$HF" --outtype "$t" --outfile "${GBASE[$t]}"
done
LORA=$GG/lora_f32.gguf
conv "$LORA" "$ADAPTER/adapter_model.safetensors" "$ADAPTER/adapter_config.json" "$HF/tokenizer.model" "$LLAMA_CPP/convert_lora_to_gguf.py" -- \
    "$PY" "$LLAMA_CPP/convert_lora_to_gguf.py" --base "$HF" --outtype f32 --outfile "$LORA" "$ADAPTER"

# Room for one output at a time (the largest base; a merge into a quantized base writes F16).
max_out=0
for t in "${BASE_TYPES[@]}"; do
    s=$(fsize "${GBASE[$t]}"); [[ $t = q8_0 ]] && s=$(( s * 2 ))
    (( s > max_out )) && max_out=$s
done
rm -f "$GG"/out-*.gguf
need=$(( max_out + (512 << 20) ))
(( $(avail_bytes "$GG") >= need )) || die "not enough free space in $GG for an output: need ~$(( need >> 20 )) MiB"

# ---------------------------------------------------------------------------------------------
# 2. Wait for the machine to be quiet
# ---------------------------------------------------------------------------------------------
others() { [[ -n $WAIT_PATTERN ]] && pgrep -f "$WAIT_PATTERN" | grep -vx "$$" | grep -v "^$BASHPID\$" || true; }
WAITED=0 WAIT_NOTE='not waited for (BENCH_WAIT_PATTERN empty)'
if [[ -n $WAIT_PATTERN ]]; then
    while [[ -n $(others) ]] && (( WAITED < WAIT_MAX )); do
        (( WAITED == 0 )) && note "== waiting for $(others | wc -l) process(es) matching '$WAIT_PATTERN' to end (at most ${WAIT_MAX}s; polling every 30s) =="
        sleep 30; WAITED=$(( WAITED + 30 ))
    done
    if [[ -n $(others) ]]; then
        still=$(others | head -n 3 | paste -sd, -)
        WAIT_NOTE="STILL RUNNING after ${WAITED}s of waiting, timed anyway: $( { ps -o pid=,args= -p "$still" || true; } | cut -c1-100 | tr '\n' ';')"
    else
        WAIT_NOTE="none running (waited ${WAITED}s)"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 3. Timing helpers (as in bench/merge_vs_mergekit.sh)
# ---------------------------------------------------------------------------------------------
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
# timed NAME CMD...: runs CMD under `/usr/bin/time -v` and `timeout`; sets WALL (s), RSS (KiB),
# CPU (user+sys s), OTHER (cores the rest of the machine used meanwhile) and STATUS.
timed() {
    local name=$1; shift
    local tf=$LOGDIR/$name.time rc=0 busy0 busy1 usr sys
    if [[ $SYNC != 0 ]]; then sync; fi
    busy0=$(busy_ticks)
    /usr/bin/time -v -o "$tf" timeout -k 10 "$TIMEOUT" "$@" >"$LOGDIR/$name.log" 2>&1 || rc=$?
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
first_error() { { grep -m1 -iE 'error|panic|exception|refus|unexpected' "$1" || tail -n 1 "$1"; } | cut -c1-200; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a > 0 && b > 0) printf "%.2fx", a/b; else print "n/a"}'; }

# cmd_for TOOL TYPE OUT: the command line of TOOL on base TYPE, into OUT (in CMD)
cmd_for() {
    local base=${GBASE[$2]} out=$3
    case $1 in
        export-lora) CMD=("$EXPORT_LORA" -m "$base" --lora "$LORA" -o "$out" -t "$THREADS") ;;
        ak-gguf)     CMD=("$BIN" merge "$base" "$LORA" -o "$out" --threads "$THREADS") ;;
        ak-peft)     CMD=("$BIN" merge "$base" "$ADAPTER" -o "$out") ;;
        cp)          CMD=(cp "$base" "$out") ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# 4. Header
# ---------------------------------------------------------------------------------------------
RESULTS=$RESULTS_DIR/gguf-merge-$(date +%Y%m%d-%H%M%S).txt
LLAMA_DESC=$("$EXPORT_LORA" --version 2>&1 | head -n 1 | sed 's/^version: //')
LLAMA_SRC=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["versions"]["llama_cpp"])' \
    "$REPO/fixtures/gguf/manifest.json" 2>/dev/null || echo 'source version unknown')
PYV=$("$PY" -c 'import sys, re, importlib.metadata as m, torch, numpy
v = re.search(r"^version\s*=\s*\"([^\"]+)\"", open(sys.argv[1] + "/pyproject.toml").read(), re.M)
print("gguf-py", v.group(1) if v else "?", "(" + sys.argv[1] + ")", "torch", torch.__version__, "transformers", m.version("transformers"),
      "sentencepiece", m.version("sentencepiece"), "numpy", numpy.__version__, "python", sys.version.split()[0])' "$LLAMA_CPP/gguf-py" 2>/dev/null || echo unknown)
adapter_desc() {
    python3 -c 'import json,sys; c=json.load(open(sys.argv[1]+"/adapter_config.json"))
print("%s r=%s alpha=%s (scale %g) on %s" % (c.get("peft_type"), c.get("r"), c.get("lora_alpha"),
      float(c.get("lora_alpha", 0)) / float(c.get("r", 1)), ",".join(sorted(c.get("target_modules") or []))))' "$1" 2>/dev/null || echo '?'
}
{
    echo "GGUF merge: adapterkit merge vs llama.cpp llama-export-lora vs cp  ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo "repo:        $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || echo ' (crates/ or Cargo files dirty)')"
    echo "adapterkit:  $BIN ($AK_VERSION)"
    echo "llama.cpp:   $EXPORT_LORA ($LLAMA_DESC; sha256 $(sha256sum "$EXPORT_LORA" | cut -c1-16)); $LLAMA_SRC"
    echo "python:      $PY: $PYV"
    echo "machine:     $(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), $(free -m | awk '/^Mem:/ {print $2}') MiB RAM, $(uname -sr)"
    echo "workdir:     $GG ($(df -PT "$GG" | awk 'NR==2 {print $2 " on " $1}')), $(( $(avail_bytes "$GG") >> 20 )) MiB free before the runs"
    echo "base:        $BASE ($(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print("%s, %d layers, hidden %d, vocab %d, %s" % (c["architectures"][0], c["num_hidden_layers"], c["hidden_size"], c["vocab_size"], c.get("torch_dtype")))' "$BASE/config.json")); tokenizer for the converter: synthetic (bench/make_sp_tokenizer.py)"
    for t in "${BASE_TYPES[@]}"; do
        echo "  base_$t.gguf $(( $(fsize "${GBASE[$t]}") >> 20 )) MiB: $(conv_desc "${GBASE[$t]}")"
    done
    echo "adapter:     $ADAPTER: $(adapter_desc "$ADAPTER"), $(( $(du -sbL "$ADAPTER" | cut -f1) >> 20 )) MiB"
    echo "  lora_f32.gguf $(( $(fsize "$LORA") >> 20 )) MiB: $(conv_desc "$LORA")"
    echo "commands:    (T = ${BASE_TYPES[*]}; each output deleted, untimed, after its run)"
    for tool in "${TOOLS[@]}"; do
        cmd_for "$tool" "${BASE_TYPES[0]}" "$GG/out-$tool.gguf"
        printf '  %-11s %s\n' "$tool" "${CMD[*]//base_${BASE_TYPES[0]}.gguf/base_T.gguf}"
    done
    echo "timing:      /usr/bin/time -v (wall clock, maximum resident set size, user + system time); $RUNS round(s) per base type," \
         "commands alternating within a round; sync before each: $([[ $SYNC != 0 ]] && echo yes || echo no)." \
         "The page cache cannot be dropped here (no root over /proc/sys/vm), so the base GGUF is read once (untimed) and every" \
         "command runs once untimed (warm-up) before the timed rounds: all timed runs read warm inputs."
    echo "other jobs:  matching '$WAIT_PATTERN': $WAIT_NOTE"
} | tee "$RESULTS"

# ---------------------------------------------------------------------------------------------
# 5. Runs
# ---------------------------------------------------------------------------------------------
declare -A WALLS RSSS CPUS FAILED OUTSZ
# busy_note: the processes matching BENCH_WAIT_PATTERN now (they may start after the wait)
busy_note() {
    [[ -n $WAIT_PATTERN ]] || return 0
    local n; n=$(others | wc -l)
    if (( n > 0 )); then printf "; %d process(es) matching '%s' running" "$n" "$WAIT_PATTERN"
    else printf "; none matching '%s'" "$WAIT_PATTERN"; fi
}
line() { printf '%-5s %-6s %-11s %8.2fs %7s MiB %7s s cpu  (others: %s cores)\n' "$1" "$2" "$3" "$WALL" "$(mib "$RSS")" "$CPU" "$OTHER"; }
for t in "${BASE_TYPES[@]}"; do
    {
        echo
        echo "== base_$t.gguf =="
    } | tee -a "$RESULTS"
    note "== reading base_$t.gguf, lora_f32.gguf and the PEFT adapter once (untimed) =="
    cat "${GBASE[$t]}" "$LORA" "$ADAPTER"/*.safetensors >/dev/null
    for tool in "${TOOLS[@]}"; do
        out=$GG/out-$tool.gguf
        rm -f "$out"
        cmd_for "$tool" "$t" "$out"
        note "== $t $tool warm-up =="
        timed "gguf-$t-$tool-warmup" "${CMD[@]}"
        if [[ $STATUS != ok ]]; then
            FAILED[$t/$tool]="warm-up ${STATUS}: $(first_error "$LOGDIR/gguf-$t-$tool-warmup.log")"
            echo "warm-up $t $tool ${STATUS^^} (log: $LOGDIR/gguf-$t-$tool-warmup.log): ${FAILED[$t/$tool]}" | tee -a "$RESULTS"
        else
            line warm "$t" "$tool" | sed 's/$/  [warm-up, not counted]/' | tee -a "$RESULTS"
        fi
        rm -f "$out"
    done
    echo "uptime before the timed runs: $(uptime)$(busy_note)" | tee -a "$RESULTS"
    for (( i = 1; i <= RUNS; i++ )); do
        for tool in "${TOOLS[@]}"; do
            [[ -n ${FAILED[$t/$tool]:-} ]] && continue
            out=$GG/out-$tool.gguf
            rm -f "$out"
            cmd_for "$tool" "$t" "$out"
            note "== $t $tool run $i of $RUNS =="
            timed "gguf-$t-$tool-$i" "${CMD[@]}"
            if [[ $STATUS = ok && ! -s $out ]]; then
                STATUS=failed; echo "exited 0 but wrote no $out" >>"$LOGDIR/gguf-$t-$tool-$i.log"
            fi
            if [[ $STATUS = ok ]]; then
                WALLS[$t/$tool]+="$WALL " RSSS[$t/$tool]+="$RSS " CPUS[$t/$tool]+="$CPU " OUTSZ[$t/$tool]=$(fsize "$out")
                line "run $i" "$t" "$tool" | tee -a "$RESULTS"
            else
                FAILED[$t/$tool]="run $i ${STATUS}: $(first_error "$LOGDIR/gguf-$t-$tool-$i.log")"
                echo "run $i $t $tool ${STATUS^^} (log: $LOGDIR/gguf-$t-$tool-$i.log): ${FAILED[$t/$tool]}; its remaining runs skipped" | tee -a "$RESULTS"
            fi
            rm -f "$out"
        done
    done
    echo "uptime after the timed runs:  $(uptime)$(busy_note)" | tee -a "$RESULTS"
done

# ---------------------------------------------------------------------------------------------
# 6. Summary
# ---------------------------------------------------------------------------------------------
med_of() { [[ -n ${WALLS[$1]:-} ]] && tr ' ' '\n' <<<"${WALLS[$1]}" | grep . | median; }
rssmed_of() { [[ -n ${RSSS[$1]:-} ]] && tr ' ' '\n' <<<"${RSSS[$1]}" | grep . | median; }
{
    echo
    echo "summary (medians of $RUNS timed runs; ratios are wall-time ratios of the medians: <1 = faster than the reference)"
    printf '%-5s %-11s %4s %8s %8s %8s %8s %8s %7s %7s %11s %8s %11s\n' base command runs wall_med wall_min wall_max rss_med cpu_med out MB/s "/export-lora" "/cp" "rss/export"
    printf '%-5s %-11s %4s %8s %8s %8s %8s %8s %7s %7s %11s %8s %11s\n' "" "" "" s s s MiB s MiB "" "" "" ""
    for t in "${BASE_TYPES[@]}"; do
        ex=$(med_of "$t/export-lora" || true) cpm=$(med_of "$t/cp" || true) exr=$(rssmed_of "$t/export-lora" || true)
        for tool in "${TOOLS[@]}"; do
            k=$t/$tool
            if [[ -z ${WALLS[$k]:-} ]]; then
                printf '%-5s %-11s FAILED: %s\n' "$t" "$tool" "${FAILED[$k]:-no runs}"
                continue
            fi
            w=$(tr ' ' '\n' <<<"${WALLS[$k]}" | grep .)
            read -r wmin wmax < <(minmax <<<"$w")
            m=$(median <<<"$w")
            r=$(rssmed_of "$k")
            printf '%-5s %-11s %4d %8.2f %8.2f %8.2f %8s %8s %7s %7.0f %11s %8s %11s\n' "$t" "$tool" "$(wc -l <<<"$w")" "$m" "$wmin" "$wmax" \
                "$(mib "$r")" "$(tr ' ' '\n' <<<"${CPUS[$k]}" | grep . | median)" "$(( ${OUTSZ[$k]:-0} >> 20 ))" \
                "$(awk -v s="$(fsize "${GBASE[$t]}")" -v w="$m" 'BEGIN {print (w > 0 ? s / w / 1e6 : 0)}')" \
                "$(ratio "$m" "${ex:-0}")" "$(ratio "$m" "${cpm:-0}")" "$(ratio "$r" "${exr:-0}")"
        done
    done
    for t in "${BASE_TYPES[@]}"; do
        ex=$(med_of "$t/export-lora" || true) cpm=$(med_of "$t/cp" || true)
        parts=()
        for tool in ak-gguf ak-peft; do
            m=$(med_of "$t/$tool" || true)
            [[ -n $m && -n $ex ]] && parts+=("$tool $(ratio "$ex" "$m") faster than export-lora")
            [[ -n $m && -n $cpm ]] && parts+=("$tool $(ratio "$m" "$cpm") of cp")
        done
        (( ${#parts[@]} )) && echo "$t: $(IFS=';'; echo "${parts[*]}" | sed 's/;/; /g')"
    done
    echo "out = size of the output; MB/s = size of the base GGUF / median wall; /export-lora and /cp = median wall / that command's median wall"
    echo "(a merge into a quantized base writes the merged tensors as F16, as export-lora does, so its output is larger than the base that cp copies);"
    echo "rss/export = median peak RSS / export-lora's. export-lora from a PEFT adapter also needs convert_lora_to_gguf.py once ($(awk '/^wall / {print $2}' "$LORA.conv")s, peak RSS $(awk '/^rss_kib / {printf "%.0f", $2 / 1024}' "$LORA.conv") MiB, above)."
} | tee -a "$RESULTS"

# ---------------------------------------------------------------------------------------------
# 7. The outputs: bench/check_gguf_merge.py (export-lora's output first)
# ---------------------------------------------------------------------------------------------
CHECK_TOOLS=()
for tool in export-lora ak-gguf ak-peft; do
    for x in "${TOOLS[@]}"; do [[ $x = "$tool" ]] && CHECK_TOOLS+=("$tool"); done
done
PER_TENSOR=()
if [[ $VERIFY = 0 ]]; then
    echo "check: not run (BENCH_VERIFY=0)" | tee -a "$RESULTS"
elif (( ${#CHECK_TOOLS[@]} == 0 )); then
    echo "check: not run (no merge command timed)" | tee -a "$RESULTS"
else
    for t in "${BASE_TYPES[@]}"; do
        per=$(fsize "${GBASE[$t]}"); [[ $t = q8_0 ]] && per=$(( per * 2 ))   # merged tensors come out F16
        need=$(( ${#CHECK_TOOLS[@]} * per + (512 << 20) ))
        CK=${BENCH_CHECKDIR:-}
        if [[ -z $CK ]]; then
            if [[ -d /dev/shm ]] && (( $(avail_bytes /dev/shm) >= need + (2 << 30) )); then CK=/dev/shm; else CK=$GG; fi
        fi
        if (( $(avail_bytes "$CK") < need )); then
            echo "check $t: not run (needs ~$(( need >> 20 )) MiB in $CK for ${#CHECK_TOOLS[@]} outputs; set BENCH_CHECKDIR)" | tee -a "$RESULTS"
            continue
        fi
        CKD=$(mktemp -d "$CK/adapterkit-gguf-check-XXXXXX")
        trap 'rm -rf "$CKD"' EXIT
        specs=()
        note "== check $t: writing ${CHECK_TOOLS[*]} outputs into $CKD (untimed) =="
        for tool in "${CHECK_TOOLS[@]}"; do
            cmd_for "$tool" "$t" "$CKD/$tool.gguf"
            if ! "${CMD[@]}" >"$LOGDIR/gguf-$t-$tool-check.log" 2>&1; then
                echo "check $t: $tool failed: $(first_error "$LOGDIR/gguf-$t-$tool-check.log")" | tee -a "$RESULTS"
                continue
            fi
            specs+=("$tool=$CKD/$tool.gguf")
        done
        same=''
        if [[ -f $CKD/ak-gguf.gguf && -f $CKD/ak-peft.gguf ]]; then
            if cmp -s "$CKD/ak-gguf.gguf" "$CKD/ak-peft.gguf"; then same=yes; else same=no; fi
        fi
        note "== check $t: bench/check_gguf_merge.py (a few minutes) =="
        rc=0
        PYTHONPATH=$LLAMA_CPP/gguf-py "$PY" "$REPO/bench/check_gguf_merge.py" --base "${GBASE[$t]}" --lora "$LORA" "${specs[@]}" \
            --per-tensor "$LOGDIR/gguf-$t-check-per-tensor.txt" --json "$LOGDIR/gguf-$t-check.json" \
            >"$LOGDIR/gguf-$t-check.log" 2>&1 || rc=$?
        {
            echo
            echo "check $t: bench/check_gguf_merge.py --base base_$t.gguf --lora lora_f32.gguf ${CHECK_TOOLS[*]/%/=...}  (exit $rc; outputs written untimed into $CKD, then deleted)"
            [[ -n $same ]] && echo "    ak-gguf.gguf and ak-peft.gguf byte-identical (cmp): $same"
            sed 's/^/    /' "$LOGDIR/gguf-$t-check.log"
        } | tee -a "$RESULTS"
        [[ -s $LOGDIR/gguf-$t-check-per-tensor.txt ]] && PER_TENSOR+=("$t")
        rm -rf "$CKD"
        trap - EXIT
    done
fi

{
    echo
    echo "disk: $(( $(du -scb "${GBASE[@]}" "$LORA" | tail -n 1 | cut -f1) >> 20 )) MiB of cached GGUF inputs in $GG, $(( $(avail_bytes "$GG") >> 20 )) MiB free after"
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$RESULTS"
{
    for t in "${PER_TENSOR[@]}"; do
        echo
        echo "per merged tensor, base_$t.gguf (max |diff| and ulps between outputs; 'off / max ulp': elements that are not the"
        echo "float64 reference rounded once to the output type, and their largest distance from it in ulps):"
        cat "$LOGDIR/gguf-$t-check-per-tensor.txt"
    done
} >>"$RESULTS"
note ""
note "results written to $RESULTS (command logs in $LOGDIR/gguf-*)"

#!/usr/bin/env bash
# Benchmark: HF checkpoint + PEFT LoRA -> quantized GGUF in one command,
#   `adapterkit merge BASE_HF ADAPTER -o out.gguf --quant q4_k_m`,
# vs the chain llama.cpp users run today,
#   PEFT merge_and_unload() + save_pretrained()  ->  convert_hf_to_gguf.py --outtype bf16  ->  llama-quantize Q4_K_M,
# wall time and peak RSS side by side (each chain step and the chain's total), with `cp -r BASE` as the floor,
# then a tensor-by-tensor comparison of the two Q4_K_M files (types and bytes) and of their KV metadata.
#
# Usage: bench/merge_quant_vs_chain.sh [ADAPTERKIT_BIN] [WORKDIR]
#   ADAPTERKIT_BIN  the adapterkit binary (default: $ADAPTERKIT, else target/release/adapterkit, honouring
#                   $CARGO_TARGET_DIR; nothing is built: cargo build --release -p adapterkit-cli)
#   WORKDIR         holds base/ (bench/gen_tinyllama.py's 22-layer BF16 TinyLlama-shaped checkpoint) and adapter/
#                   (its rank-16 PEFT LoRA on all 7 linears); default ${TMPDIR:-/tmp}/adapterkit-bench, the work dir
#                   of the other scripts. Both are generated (python3 + numpy, ~30 s, 2.25 GB) when
#                   WORKDIR/GENERATED.json is missing. WORKDIR/gguf/base_hf (symlinks to base/ plus the synthetic
#                   32000-piece sentencepiece tokenizer of bench/make_sp_tokenizer.py, which convert_hf_to_gguf.py
#                   needs) is made when missing, as bench/merge_gguf_vs_export_lora.sh does. Outputs go to
#                   WORKDIR/quant.
#
# What is timed, RUNS rounds, alternating (each under /usr/bin/time -v; outputs deleted, untimed, after the round):
#   cp         cp -r WORKDIR/base OUT                                              (the floor: 2.2 GB copied)
#   adapterkit adapterkit merge base_hf adapter -o ak.gguf --quant Q               (one command, default threads)
#   chain      1. peft      python bench/peft_merge.py base_hf adapter DIR/base_hf  (bf16, as the base; torch threads
#                           = cores; merge_and_unload + save_pretrained, one model.safetensors)
#              2. convert   python convert_hf_to_gguf.py DIR/base_hf --outtype bf16 --outfile conv.gguf
#                           (--outtype auto, the converter's default, also picks bf16 for a bf16 model, and
#                           tools/quantize/README.md converts with --outtype bf16 before llama-quantize)
#              3. quantize  llama-quantize conv.gguf chain.gguf Q4_K_M THREADS
#              (the tokenizer files are copied into DIR/base_hf, untimed, between 1 and 2; DIR/base_hf is named like
#              the base because convert_hf_to_gguf.py derives general.name from the directory name)
#   chain total = the sum of the three steps' wall times; its peak RSS = the largest of the three.
# Before the timed rounds the inputs are read once (cat > /dev/null) and python imports torch/transformers/peft and
# the converter's modules once (untimed), so every run reads warm inputs. There is no full warm-up run of each
# command (a round takes minutes); use RUNS >= 3 and read the medians.
#
# Check (BENCH_VERIFY=1, default): the last round's ak.gguf and chain.gguf, compared with gguf-py: tensor names,
# order, types, shapes and bytes, and KV keys, types and values. Differing tensors are listed with the first
# differing byte and the number of differing blocks. With BENCH_DIAG=1 (default, if there is room), untimed:
#   * `adapterkit quantize DIR/base_hf -o ak-requant.gguf --type Q` on the chain's own PEFT-merged checkpoint, compared
#     with chain.gguf the same way: the same merged weights in, so this checks adapterkit's converter + quantizer alone;
#   * `adapterkit merge base_hf adapter -o merged/` (safetensors), compared element by element with the chain's
#     PEFT-merged checkpoint: this checks the merge arithmetic alone (bf16 rounding flips show up here).
#
# Environment:
#   RUNS=N                timed rounds (default 3; RUNS=1 for a quick run)
#   BENCH_QUANT=q4_k_m    the scheme (any llama-quantize type adapterkit --quant accepts: q4_k_m, q5_k_m, q8_0, q6_k...)
#   BENCH_OUTTYPE=bf16    convert_hf_to_gguf.py --outtype of the chain (bf16 or f32)
#   BENCH_THREADS=N       llama-quantize threads (default: nproc); adapterkit and torch use one per core by default
#   LLAMA_CPP=DIR         llama.cpp source tree with build/bin/llama-quantize (default ~/.cache/adapterkit-gguf/llama.cpp-src)
#   REFERENCE_PYTHON=PY   python with torch, transformers, peft, safetensors, sentencepiece, numpy
#                         (default ~/.cache/adapterkit-reference/venv/bin/python); gguf-py comes from LLAMA_CPP/gguf-py
#   BENCH_ADAPTER=DIR     the PEFT LoRA (default WORKDIR/adapter)
#   BENCH_TIMEOUT=S       kill a command after S seconds (default 1800)
#   BENCH_WAIT_PATTERN=RE before timing, wait while `pgrep -f RE` finds processes (default fuzz); '' to not wait
#   BENCH_WAIT_MAX=S      wait at most S seconds (default 1500), polling every 30 s; then time anyway and say so
#   BENCH_VERIFY=0        skip the comparison of the two outputs
#   BENCH_DIAG=0          skip the bf16 merged-tensor diagnosis
#   BENCH_SYNC=0          do not `sync` (untimed) before each timed command
#   BENCH_RESULTS_DIR=DIR where the results file goes (default bench/results)
#   BENCH_OUTDIR=DIR      where the outputs and intermediates go (default WORKDIR/quant); on tmpfs (/dev/shm) the
#                         results say so: writes then cost RAM copies, which flatters the chain's 4.4 GB of intermediates
#
# Results: bench/results/quant-chain-YYYYMMDD-HHMMSS.txt; command logs in WORKDIR/logs/quant-*.
# Disk: BENCH_OUTDIR (default WORKDIR/quant) needs about 2 x the base (2.2 GB each) + 2 x the Q4_K_M output (~0.7 GB each) free, + ~3 GB for
# BENCH_DIAG.
set -euo pipefail

die() { printf 'merge_quant_vs_chain.sh: error: %s\n' "$*" >&2; exit 1; }
note() { printf '%s\n' "$*" >&2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_ARG=${1:-${ADAPTERKIT:-}}
WORKDIR=${2:-${TMPDIR:-/tmp}/adapterkit-bench}
RUNS=${RUNS:-3}
QUANT=${BENCH_QUANT:-q4_k_m}
OUTTYPE=${BENCH_OUTTYPE:-bf16}
THREADS=${BENCH_THREADS:-$(nproc)}
LLAMA_CPP=${LLAMA_CPP:-$HOME/.cache/adapterkit-gguf/llama.cpp-src}
PY=${REFERENCE_PYTHON:-$HOME/.cache/adapterkit-reference/venv/bin/python}
TIMEOUT=${BENCH_TIMEOUT:-1800}
WAIT_PATTERN=${BENCH_WAIT_PATTERN-fuzz}
WAIT_MAX=${BENCH_WAIT_MAX:-1500}
VERIFY=${BENCH_VERIFY:-1}
DIAG=${BENCH_DIAG:-1}
SYNC=${BENCH_SYNC:-1}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$REPO/bench/results}

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "BENCH_THREADS must be a positive integer, got '$THREADS'"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "BENCH_TIMEOUT must be a positive integer"
[[ $WAIT_MAX =~ ^[0-9]+$ ]] || die "BENCH_WAIT_MAX must be a non-negative integer"
[[ $QUANT =~ ^[a-z0-9_]+$ ]] || die "BENCH_QUANT: bad scheme '$QUANT'"
[[ $OUTTYPE =~ ^(bf16|f32)$ ]] || die "BENCH_OUTTYPE must be bf16 or f32, got '$OUTTYPE'"
QTYPE=${QUANT^^}
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is required (apt-get install time)"
[[ $(/usr/bin/time -v true 2>&1) = *'Maximum resident set size'* ]] || die "/usr/bin/time -v must be GNU time"
command -v timeout >/dev/null || die "timeout (coreutils) is required"

QUANTIZE=$LLAMA_CPP/build/bin/llama-quantize
[[ -x $QUANTIZE ]] || die "$QUANTIZE not found (set LLAMA_CPP; see fixtures/gguf/README.md for the build)"
[[ -f $LLAMA_CPP/convert_hf_to_gguf.py && -d $LLAMA_CPP/gguf-py ]] || die "$LLAMA_CPP lacks convert_hf_to_gguf.py or gguf-py/"
[[ -x $PY ]] || die "$PY not found (set REFERENCE_PYTHON)"
"$PY" -c 'import torch, transformers, peft, numpy, sentencepiece, safetensors' 2>/dev/null \
    || die "$PY cannot import torch, transformers, peft, numpy, sentencepiece and safetensors"

mkdir -p "$WORKDIR" "$RESULTS_DIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
BASE=$WORKDIR/base
ADAPTER=${BENCH_ADAPTER:-$WORKDIR/adapter}
GG=$WORKDIR/gguf
HF=$GG/base_hf
QD=${BENCH_OUTDIR:-$WORKDIR/quant}
LOGDIR=$WORKDIR/logs
mkdir -p "$GG" "$QD" "$LOGDIR"
# One benchmark per work dir (shared with the other scripts).
if command -v flock >/dev/null; then
    exec 9>"$WORKDIR/.bench.lock"
    flock -n 9 || die "another benchmark holds $WORKDIR/.bench.lock; wait for it or use another WORKDIR"
fi

avail_bytes() { echo $(( $(df -Pk "$1" | awk 'NR==2 {print $4}') * 1024 )); }
fsize() { stat -c %s "$1"; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# ---------------------------------------------------------------------------------------------
# 1. Inputs: the generated checkpoint + adapter, and base_hf with a tokenizer (once)
# ---------------------------------------------------------------------------------------------
if [[ ! -f $WORKDIR/GENERATED.json ]]; then
    (( $(avail_bytes "$WORKDIR") >= 3 << 30 )) || die "not enough free space in $WORKDIR to generate the checkpoint (~2.3 GB)"
    note "== generating the 22-layer TinyLlama-shaped checkpoint and adapter in $WORKDIR (once, ~30 s) =="
    rm -rf "$BASE" "$WORKDIR/adapter"
    python3 -c 'import numpy' 2>/dev/null || die "python3 has no numpy (bench/gen_tinyllama.py needs python3 + numpy)"
    python3 "$REPO/bench/gen_tinyllama.py" "$WORKDIR" || die "bench/gen_tinyllama.py failed"
fi
[[ -f $BASE/config.json ]] && compgen -G "$BASE/*.safetensors" >/dev/null \
    || die "$BASE has no checkpoint; delete $WORKDIR/GENERATED.json to regenerate"
[[ -f $ADAPTER/adapter_config.json ]] || die "$ADAPTER has no adapter_config.json"
BASE_STAMP=$WORKDIR/GENERATED.json
if [[ ! -f $HF/tokenizer.model || $HF/tokenizer.model -ot $BASE_STAMP || $HF/tokenizer.model -ot $REPO/bench/make_sp_tokenizer.py ]]; then
    note "== $HF: symlinks to $BASE + a synthetic tokenizer =="
    rm -rf "$HF"; mkdir -p "$HF"
    for f in "$BASE"/*; do ln -s "$f" "$HF/"; done
    "$PY" "$REPO/bench/make_sp_tokenizer.py" "$HF" >&2 || die "make_sp_tokenizer.py failed"
fi

if [[ -z $BIN_ARG ]]; then
    target=${CARGO_TARGET_DIR:-$REPO/target}
    [[ $target = /* ]] || target=$REPO/$target
    BIN_ARG=$target/release/adapterkit
fi
[[ -x $BIN_ARG ]] || die "$BIN_ARG is not an executable file (build it with cargo build --release -p adapterkit-cli, or pass its path)"
BIN=$(cd "$(dirname "$BIN_ARG")" && pwd)/$(basename "$BIN_ARG")
"$BIN" merge --help 2>/dev/null | grep -q -- '--quant' || die "$BIN merge has no --quant option (too old?)"
AK_VERSION="$("$BIN" --version 2>/dev/null || echo 'version unknown'), built $(date -u -r "$BIN" +%Y-%m-%dT%H:%M:%SZ)"

BASE_BYTES=$(du -sbL "$BASE" | cut -f1)
rm -rf "$QD"/round "$QD"/check
mkdir -p "$QD/round"
need=$(( 2 * BASE_BYTES + BASE_BYTES / 2 + (512 << 20) ))
(( $(avail_bytes "$QD") >= need )) || die "not enough free space in $QD: need ~$(( need >> 20 )) MiB (2 x base + 2 x output; set BENCH_OUTDIR)"
QD_FS=$(df -PT "$QD" | awk 'NR==2 {print $2}')
OUT_NOTE=''
if [[ $QD_FS = tmpfs ]]; then
    mem_avail=$(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) * 1024 ))
    (( mem_avail >= need + (4 << 30) )) || die "$QD is tmpfs and MemAvailable is $(( mem_avail >> 20 )) MiB: need ~$(( (need >> 20) + 4096 )) MiB"
    OUT_NOTE="OUTPUTS ON TMPFS ($QD): writing costs a RAM copy, not a disk write; this favours the chain, which writes ~2 x the base of intermediates, and adapterkit's and the chain's outputs count against RAM."
fi

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
# 3. Timing helpers (as in bench/merge_gguf_vs_export_lora.sh)
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

R=$QD/round
CHDIR=$R/chain/base_hf  # named like the base: convert_hf_to_gguf.py derives general.name from the directory
# cmd_for STEP: the command line of STEP (in CMD)
cmd_for() {
    case $1 in
        cp)         CMD=(cp -r "$BASE" "$R/cp") ;;
        adapterkit) CMD=("$BIN" merge "$HF" "$ADAPTER" -o "$R/ak.gguf" --quant "$QUANT") ;;
        peft)       CMD=("$PY" "$REPO/bench/peft_merge.py" "$HF" "$ADAPTER" "$CHDIR") ;;
        convert)    CMD=("$PY" "$LLAMA_CPP/convert_hf_to_gguf.py" "$CHDIR" --outtype "$OUTTYPE" --outfile "$R/conv.gguf") ;;
        quantize)   CMD=("$QUANTIZE" "$R/conv.gguf" "$R/chain.gguf" "$QTYPE" "$THREADS") ;;
    esac
}
STEPS=(cp adapterkit peft convert quantize)

# ---------------------------------------------------------------------------------------------
# 4. Header
# ---------------------------------------------------------------------------------------------
RESULTS=$RESULTS_DIR/quant-chain-$(date +%Y%m%d-%H%M%S).txt
LLAMA_SRC=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["versions"]["llama_cpp"])' \
    "$REPO/fixtures/gguf/manifest.json" 2>/dev/null || echo 'source version unknown')
PYV=$("$PY" -c 'import sys, re, importlib.metadata as m, torch, numpy
v = re.search(r"^version\s*=\s*\"([^\"]+)\"", open(sys.argv[1] + "/pyproject.toml").read(), re.M)
print("torch", torch.__version__, "(threads %d)" % torch.get_num_threads(), "transformers", m.version("transformers"), "peft", m.version("peft"),
      "safetensors", m.version("safetensors"), "gguf-py", v.group(1) if v else "?", "numpy", numpy.__version__, "python", sys.version.split()[0])' "$LLAMA_CPP/gguf-py" 2>/dev/null || echo unknown)
ADESC=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1]+"/adapter_config.json"))
print("%s r=%s alpha=%s (scale %g) on %s" % (c.get("peft_type"), c.get("r"), c.get("lora_alpha"),
      float(c.get("lora_alpha", 0)) / float(c.get("r", 1)), ",".join(sorted(c.get("target_modules") or []))))' "$ADAPTER" 2>/dev/null || echo '?')
{
    echo "HF + PEFT LoRA -> $QTYPE GGUF: adapterkit merge --quant $QUANT vs PEFT merge -> convert_hf_to_gguf -> llama-quantize vs cp  ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo "repo:        $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || echo ' (crates/ or Cargo files dirty)')"
    echo "adapterkit:  $BIN ($AK_VERSION)"
    echo "llama.cpp:   $QUANTIZE (sha256 $(sha256sum "$QUANTIZE" | cut -c1-16)); $LLAMA_SRC"
    echo "python:      $PY: $PYV"
    echo "machine:     $(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), $(free -m | awk '/^Mem:/ {print $2}') MiB RAM, $(uname -sr)"
    echo "workdir:     $QD ($(df -PT "$QD" | awk 'NR==2 {print $2 " on " $1}')), $(( $(avail_bytes "$QD") >> 20 )) MiB free before the runs"
    echo "base:        $HF -> $BASE ($(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print("%s, %d layers, hidden %d, vocab %d, %s" % (c["architectures"][0], c["num_hidden_layers"], c["hidden_size"], c["vocab_size"], c.get("torch_dtype") or c.get("dtype")))' "$BASE/config.json"), $(( BASE_BYTES >> 20 )) MiB); tokenizer: synthetic (bench/make_sp_tokenizer.py)"
    echo "adapter:     $ADAPTER: $ADESC, $(( $(du -sbL "$ADAPTER" | cut -f1) >> 20 )) MiB"
    echo "commands:    (outputs in $R, deleted untimed after each round)"
    for s in "${STEPS[@]}"; do
        cmd_for "$s"
        printf '  %-11s %s\n' "$s" "${CMD[*]}"
    done
    echo "             chain = peft + convert + quantize (tokenizer files copied into $CHDIR, untimed, after peft)"
    echo "timing:      /usr/bin/time -v (wall clock, maximum resident set size, user + system time); $RUNS round(s), commands alternating" \
         "within a round; sync before each: $([[ $SYNC != 0 ]] && echo yes || echo no). The page cache cannot be dropped here, so" \
         "the inputs are read once (untimed) and python's imports are warmed once before the timed rounds: all timed runs read warm inputs."
    echo "other jobs:  matching '$WAIT_PATTERN': $WAIT_NOTE"
    [[ -n $OUT_NOTE ]] && echo "note:        $OUT_NOTE"
    true
} | tee "$RESULTS"

# ---------------------------------------------------------------------------------------------
# 5. Runs
# ---------------------------------------------------------------------------------------------
note "== reading the base and adapter once, and warming python's imports (untimed) =="
cat "$BASE"/*.safetensors "$ADAPTER"/*.safetensors >/dev/null
"$PY" -c 'import torch, transformers, peft, safetensors' >/dev/null 2>&1 || true
"$PY" "$LLAMA_CPP/convert_hf_to_gguf.py" --help >/dev/null 2>&1 || true

declare -A WALLS RSSS CPUS FAILED OUTSZ
busy_note() {
    [[ -n $WAIT_PATTERN ]] || return 0
    local n; n=$(others | wc -l)
    if (( n > 0 )); then printf "; %d process(es) matching '%s' running" "$n" "$WAIT_PATTERN"
    else printf "; none matching '%s'" "$WAIT_PATTERN"; fi
}
line() { printf '%-7s %-11s %8.2fs %7s MiB %7s s cpu  (others: %s cores)%s\n' "$1" "$2" "$WALL" "$(mib "$RSS")" "$CPU" "$OTHER" "${3:-}"; }
echo "uptime before the timed runs: $(uptime)$(busy_note)" | tee -a "$RESULTS"
CHAIN_TOTALS='' CHAIN_PEAKS=''
for (( i = 1; i <= RUNS; i++ )); do
    rm -rf "${R:?}"/*
    chain_ok=1 chain_total=0 chain_peak=0
    for s in "${STEPS[@]}"; do
        case $s in peft | convert | quantize) (( chain_ok )) || continue ;; esac
        [[ -n ${FAILED[$s]:-} ]] && { [[ $s = peft || $s = convert || $s = quantize ]] && chain_ok=0; continue; }
        cmd_for "$s"
        note "== run $i of $RUNS: $s =="
        [[ $s = peft ]] && mkdir -p "$(dirname "$CHDIR")"
        timed "quant-$s-$i" "${CMD[@]}"
        out=''
        case $s in
            cp) out=$R/cp ;; adapterkit) out=$R/ak.gguf ;; peft) out=$CHDIR/config.json ;;
            convert) out=$R/conv.gguf ;; quantize) out=$R/chain.gguf ;;
        esac
        if [[ $STATUS = ok && ! -e $out ]]; then
            STATUS=failed; echo "exited 0 but wrote no $out" >>"$LOGDIR/quant-$s-$i.log"
        fi
        if [[ $STATUS = ok ]]; then
            sz=$(du -sbL "$out" | cut -f1); [[ $s = peft ]] && sz=$(du -sb "$CHDIR" | cut -f1)
            WALLS[$s]+="$WALL " RSSS[$s]+="$RSS " CPUS[$s]+="$CPU " OUTSZ[$s]=$sz
            extra=''
            [[ $s = peft ]] && extra="  [$(grep -m1 '^peft_merge: import' "$LOGDIR/quant-$s-$i.log" | sed 's/^peft_merge: //')]"
            [[ $s = adapterkit ]] && extra="  [$(grep -m1 '^merged ' "$LOGDIR/quant-$s-$i.log" | sed 's/.*: //' | cut -c1-80)]"
            line "run $i" "$s" "$extra" | tee -a "$RESULTS"
            case $s in
                peft | convert | quantize)
                    chain_total=$(awk -v a="$chain_total" -v b="$WALL" 'BEGIN {printf "%.2f", a + b}')
                    if (( RSS > chain_peak )); then chain_peak=$RSS; fi ;;
            esac
        else
            FAILED[$s]="run $i ${STATUS}: $(first_error "$LOGDIR/quant-$s-$i.log")"
            echo "run $i $s ${STATUS^^} (log: $LOGDIR/quant-$s-$i.log): ${FAILED[$s]}; its remaining runs skipped" | tee -a "$RESULTS"
            case $s in peft | convert | quantize) chain_ok=0 ;; esac
        fi
        # free the disk as the chain would (untimed): the merged checkpoint after converting, conv.gguf after quantizing
        case $s in
            cp) rm -rf "$R/cp" ;;
            peft) if (( chain_ok )); then cp "$HF"/tokenizer* "$CHDIR/"; fi ;;
            convert) if [[ $DIAG = 0 || $i -lt $RUNS ]]; then rm -rf "$R/chain"; fi ;;
            quantize) rm -f "$R/conv.gguf" ;;
        esac
    done
    if (( chain_ok )); then
        CHAIN_TOTALS+="$chain_total " CHAIN_PEAKS+="$chain_peak "
        WALL=$chain_total RSS=$chain_peak CPU='-' OTHER='-'
        printf '%-7s %-11s %8.2fs %7s MiB\n' "run $i" "chain" "$WALL" "$(mib "$RSS")" | tee -a "$RESULTS"
    fi
    if (( i < RUNS )); then rm -rf "${R:?}"/*; fi
done
echo "uptime after the timed runs:  $(uptime)$(busy_note)" | tee -a "$RESULTS"

# ---------------------------------------------------------------------------------------------
# 6. Summary
# ---------------------------------------------------------------------------------------------
med_list() { tr ' ' '\n' <<<"$1" | grep . | median; }
{
    echo
    echo "summary (medians of $RUNS timed run(s); chain = peft + convert + quantize, its RSS = the largest step's)"
    printf '%-11s %4s %8s %8s %8s %8s %8s %8s %9s %9s\n' command runs wall_med wall_min wall_max rss_med cpu_med out /chain /cp
    printf '%-11s %4s %8s %8s %8s %8s %8s %8s %9s %9s\n' "" "" s s s MiB s MiB "" ""
    chm=$( [[ -n $CHAIN_TOTALS ]] && med_list "$CHAIN_TOTALS" || true)
    cpm=$( [[ -n ${WALLS[cp]:-} ]] && med_list "${WALLS[cp]}" || true)
    for s in cp adapterkit peft convert quantize chain; do
        if [[ $s = chain ]]; then
            w=$CHAIN_TOTALS r=$CHAIN_PEAKS c='' sz=${OUTSZ[quantize]:-0}
        else
            w=${WALLS[$s]:-} r=${RSSS[$s]:-} c=${CPUS[$s]:-} sz=${OUTSZ[$s]:-0}
        fi
        if [[ -z $w ]]; then
            printf '%-11s FAILED: %s\n' "$s" "${FAILED[$s]:-${FAILED[peft]:-${FAILED[convert]:-${FAILED[quantize]:-no runs}}}}"
            continue
        fi
        m=$(med_list "$w"); read -r wmin wmax < <(tr ' ' '\n' <<<"$w" | grep . | minmax)
        printf '%-11s %4d %8.2f %8.2f %8.2f %8s %8s %8s %9s %9s\n' "$s" "$(tr ' ' '\n' <<<"$w" | grep -c .)" "$m" "$wmin" "$wmax" \
            "$(mib "$(med_list "$r")")" "$( [[ -n $c ]] && med_list "$c" || echo -)" "$(( sz >> 20 ))" \
            "$(ratio "$m" "${chm:-0}")" "$(ratio "$m" "${cpm:-0}")"
    done
    akm=$( [[ -n ${WALLS[adapterkit]:-} ]] && med_list "${WALLS[adapterkit]}" || true)
    akr=$( [[ -n ${RSSS[adapterkit]:-} ]] && med_list "${RSSS[adapterkit]}" || true)
    chr=$( [[ -n $CHAIN_PEAKS ]] && med_list "$CHAIN_PEAKS" || true)
    if [[ -n $akm && -n $chm ]]; then
        echo "adapterkit is $(ratio "$chm" "$akm") faster than the chain (median wall), at $(ratio "$akr" "$chr") of its peak RSS;" \
             "adapterkit = $(ratio "$akm" "${cpm:-0}") of cp, chain = $(ratio "$chm" "${cpm:-0}") of cp"
    fi
    echo "out = size of the output (peft: the merged checkpoint; convert: the $OUTTYPE GGUF; cp: the copied base); /chain and /cp = median wall / that one's median wall"
} | tee -a "$RESULTS"

# ---------------------------------------------------------------------------------------------
# 7. The outputs: tensor by tensor (the last round's ak.gguf and chain.gguf)
# ---------------------------------------------------------------------------------------------
if [[ $VERIFY = 0 ]]; then
    echo "check: not run (BENCH_VERIFY=0)" | tee -a "$RESULTS"
elif [[ ! -s $R/ak.gguf || ! -s $R/chain.gguf ]]; then
    echo "check: not run (the last round has no ak.gguf or no chain.gguf)" | tee -a "$RESULTS"
else
    note "== check: $R/ak.gguf vs $R/chain.gguf (gguf-py) =="
    MERGED_ARGS=() REQUANT_DESC=''
    if [[ $DIAG != 0 ]]; then
        if [[ ! -f $CHDIR/config.json ]]; then
            echo "diag: not run (the chain's merged checkpoint is gone)" >>"$LOGDIR/quant-check.log"
        elif (( $(avail_bytes "$QD") < BASE_BYTES + (512 << 20) )); then
            echo "diag: not run (needs ~$(( (BASE_BYTES >> 20) + 512 )) MiB free in $QD)" | tee -a "$RESULTS"
        else
            if "$BIN" merge "$HF" "$ADAPTER" -o "$R/ak-merged" >"$LOGDIR/quant-diag-merge.log" 2>&1; then
                MERGED_ARGS+=(--ak-merged "$R/ak-merged" --peft-merged "$CHDIR")
            else
                echo "diag: adapterkit merge to safetensors failed: $(first_error "$LOGDIR/quant-diag-merge.log")" | tee -a "$RESULTS"
            fi
            note "== diag: adapterkit quantize on PEFT's merged checkpoint =="
            timed quant-diag-requant "$BIN" quantize "$CHDIR" -o "$R/ak-requant.gguf" --type "$QUANT"
            if [[ $STATUS = ok && -s $R/ak-requant.gguf ]]; then
                MERGED_ARGS+=(--requant "$R/ak-requant.gguf")
                REQUANT_DESC="adapterkit quantize DIR/base_hf -o ak-requant.gguf --type $QUANT (PEFT's merged checkpoint, untimed for the summary): ${WALL}s, $(mib "$RSS") MiB"
            else
                echo "diag: adapterkit quantize on the PEFT merge failed: $(first_error "$LOGDIR/quant-diag-requant.log")" | tee -a "$RESULTS"
            fi
        fi
    fi
    rc=0
    PYTHONPATH=$LLAMA_CPP/gguf-py "$PY" - "$R/ak.gguf" "$R/chain.gguf" "${MERGED_ARGS[@]}" >"$LOGDIR/quant-check.log" 2>&1 <<'PYEOF' || rc=$?
import argparse, json, sys
import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

ap = argparse.ArgumentParser()
ap.add_argument("ak"); ap.add_argument("chain")
ap.add_argument("--ak-merged"); ap.add_argument("--peft-merged"); ap.add_argument("--requant")
a = ap.parse_args()
def kv(r):
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001
            v = [bytes(p).hex() for p in f.parts]
        out[k] = ([t.name for t in f.types], v)
    return out


def compare(pa, pb, la, lb):
    """prints the comparison of GGUF files pa (label la) and pb (label lb); returns True when they differ"""
    A, B = gguf.GGUFReader(pa), gguf.GGUFReader(pb)
    ta, tb = {t.name: t for t in A.tensors}, {t.name: t for t in B.tensors}
    print(f"tensors: {la} {len(ta)}, {lb} {len(tb)}; only in {la}: {sorted(set(ta) - set(tb))[:5]}; "
          f"only in {lb}: {sorted(set(tb) - set(ta))[:5]}")
    print(f"tensor order: {'same' if [t.name for t in A.tensors] == [t.name for t in B.tensors] else 'DIFFERS (harmless)'}")
    same, diffs, tdiff = 0, [], []
    same_by_type, n_by_type = {}, {}
    for t in B.tensors:
        if t.name not in ta:
            continue
        x = ta[t.name]
        k = t.tensor_type.name
        n_by_type[k] = n_by_type.get(k, 0) + 1
        if x.tensor_type != t.tensor_type or list(x.shape) != list(t.shape):
            tdiff.append(f"{t.name}: {la} {x.tensor_type.name} {list(map(int, x.shape))} vs {lb} {k} {list(map(int, t.shape))}")
            continue
        xb = A.data[x.data_offset: x.data_offset + x.n_bytes]
        yb = B.data[t.data_offset: t.data_offset + t.n_bytes]
        if np.array_equal(xb, yb):
            same += 1
            same_by_type[k] = same_by_type.get(k, 0) + 1
            continue
        ne = np.nonzero(np.asarray(xb) != np.asarray(yb))[0]
        bs, ts = gguf.GGML_QUANT_SIZES[t.tensor_type]
        off = int(ne[0]); lo = off - off % ts
        w0, w1 = max(lo, off - 4), min(lo + ts, off + 8)
        blocks = np.unique(ne // ts)
        diffs.append((t.name, k, len(blocks), x.n_bytes // ts, ne.size, off,
                      bytes(xb[w0:w1]).hex(), bytes(yb[w0:w1]).hex(), w0 - lo))
    print(f"types ({lb}'s file): " + ", ".join(f"{k} {same_by_type.get(k, 0)}/{v} identical" for k, v in sorted(n_by_type.items())))
    print(f"identical tensors (type, shape, bytes): {same} of {len(tb)}; type/shape differs: {len(tdiff)}; bytes differ: {len(diffs)}"
          + (f" (in {sum(d[2] for d in diffs)} of {sum(d[3] for d in diffs)} blocks of those tensors)" if diffs else ""))
    for d in tdiff[:20]:
        print(f"  TYPE {d}")
    for n, k, nb, tot, nbytes, off, hx, hy, w in diffs[:40]:
        ts = gguf.GGML_QUANT_SIZES[QT[k]][1]
        print(f"  BYTES {n} ({k}): {nb} of {tot} blocks differ ({nbytes} bytes); first at byte {off} = block {off // ts} byte {off % ts}; "
              f"block bytes {w}..: {la} {hx} vs {lb} {hy}")
    if len(diffs) > 40:
        print(f"  ... and {len(diffs) - 40} more")
    ka, kb = kv(A), kv(B)
    kvd = [f"only in {la}: {k}" for k in sorted(set(ka) - set(kb))] + [f"only in {lb}: {k} = {repr(kb[k][1])[:60]}" for k in sorted(set(kb) - set(ka))]
    for k in sorted(set(ka) & set(kb)):
        if ka[k] != kb[k]:
            va, vb = repr(ka[k][1]), repr(kb[k][1])
            kvd.append(f"{k}: {la} {ka[k][0]} {va[:60]} vs {lb} {kb[k][0]} {vb[:60]}")
    print(f"KV: {len(ka)} keys in {la}'s file, {len(kb)} in {lb}'s; {'all equal (types and values)' if not kvd else str(len(kvd)) + ' difference(s)'}"
          f"; KV order {'same' if [k for k in ka if k in kb] == [k for k in kb if k in ka] else 'differs'}")
    for d in kvd[:20]:
        print(f"  KV {d}")
    return bool(tdiff or diffs or kvd or set(ta) ^ set(tb))


bad = compare(a.ak, a.chain, "adapterkit", "chain")
if a.requant:
    print()
    print("diag: adapterkit quantize of PEFT's merged checkpoint (ak-requant.gguf) vs chain.gguf -- the same merged bf16 weights, "
          "so this isolates adapterkit's converter + quantizer from its merge arithmetic:")
    compare(a.requant, a.chain, "ak-requant", "chain")
    print()

if a.ak_merged and a.peft_merged:
    # diagnosis: the merged bf16 tensors before quantization, adapterkit (safetensors output) vs PEFT's save_pretrained
    import glob, os
    from safetensors import safe_open

    def opener(d):
        fs = {}
        for p in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            h = safe_open(p, "pt")
            for k in h.keys():
                fs[k] = h
        return fs

    import torch
    fa, fb = opener(a.ak_merged), opener(a.peft_merged)
    n_el = n_diff = n_t = 0
    worst = []
    for k in sorted(set(fa) & set(fb)):
        x, y = fa[k].get_tensor(k), fb[k].get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape:
            worst.append((k, -1, f"{x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}"))
            continue
        d = int((x.view(torch.int16) != y.view(torch.int16)).sum()) if x.dtype == torch.bfloat16 else int((x != y).sum())
        n_el += x.numel()
        if d:
            n_t += 1; n_diff += d
            worst.append((k, d, f"max |diff| {float((x.float() - y.float()).abs().max()):.3e}"))
    print(f"diag: merged checkpoints before quantization, adapterkit merge (safetensors) vs PEFT merge_and_unload+save_pretrained: "
          f"{len(set(fa) & set(fb))} common tensors ({len(set(fa) ^ set(fb))} not common), {n_t} differ, "
          f"{n_diff} of {n_el} elements differ")
    worst.sort(key=lambda w: -w[1])
    for k, d, s in worst[:12]:
        print(f"  MERGED {k}: {d} elements differ, {s}")
sys.exit(1 if bad else 0)
PYEOF
    {
        echo
        echo "check: the last round's ak.gguf vs chain.gguf, gguf-py (exit $rc: 0 = same tensors, types, bytes and KVs)"
        [[ -n $REQUANT_DESC ]] && echo "  diag: $REQUANT_DESC"
        sed 's/^/    /' "$LOGDIR/quant-check.log"
    } | tee -a "$RESULTS"
fi
rm -rf "${R:?}"/*

{
    echo
    echo "disk: $(( $(avail_bytes "$QD") >> 20 )) MiB free in $QD after"
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$RESULTS"
note ""
note "results written to $RESULTS (command logs in $LOGDIR/quant-*)"

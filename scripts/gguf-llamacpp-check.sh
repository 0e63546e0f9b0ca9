#!/usr/bin/env bash
# Prove that GGUF files written by adapterkit load and run in llama.cpp with the right numbers.
#
#   scripts/gguf-llamacpp-check.sh
#
#  1. `adapterkit merge fixtures/gguf/base_<T>.gguf fixtures/gguf/<case>/adapter -o m.gguf` for the PEFT cases plain,
#     patterns, rslora, embed_head, lora_bias, dora (base f32; also f16 and q8_0 for plain), run m.gguf in llama.cpp
#     (libllama, no adapter) and compare its logits with transformers running the UNMERGED PEFT model.
#  2. `adapterkit convert <case>/adapter --to gguf --base fixtures/gguf/base_hf -o a.gguf` for plain, patterns, rslora,
#     embed_head; llama.cpp base_f32.gguf + runtime LoRA a.gguf vs unmerged PEFT, and the same with the fixture's
#     llama.cpp-converted <case>/adapter_f32.gguf (which loses alpha_pattern and rsLoRA).
#  3. Prints a summary table and writes it to bench/results/gguf-llamacpp-<date>.txt.
#
# Exit status: 0 all adapterkit rows pass, 1 a check failed (the table says which), 2 a prerequisite is missing.
#
# Needs (nothing is downloaded, llama.cpp is not rebuilt):
#   * llama.cpp source + build with build/bin/libllama.so: $ADAPTERKIT_LLAMA_CPP, else the first of
#     ~/.cache/adapterkit-reference/llama.cpp and ~/.cache/adapterkit-gguf/llama.cpp-src that has it (the build
#     fixtures/gguf/generate.py uses; see fixtures/gguf/README.md for how it was built)
#   * the reference python venv: $ADAPTERKIT_REFERENCE_PY, else ~/.cache/adapterkit-reference/venv/bin/python
#     (torch, transformers, peft, safetensors, numpy; gguf-py is taken from the llama.cpp tree)
#   * a C++ compiler ($CXX, else g++/c++) to compile fixtures/gguf/lora_logits.cpp against libllama (a few seconds)
#   * the adapterkit binary: $ADAPTERKIT_BIN, else `cargo build --release -p adapterkit-cli` is run first
#     (set ADAPTERKIT_NO_BUILD=1 to use target/release/adapterkit as it is)
# Env: ADAPTERKIT_KEEP_TMP=1 keeps the temp dir (merged/converted GGUF files, logits) and prints its path.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FIX="$REPO/fixtures/gguf"
RESULTS="$REPO/bench/results"

die() { echo "gguf-llamacpp-check: $*" >&2; exit 2; }

# ---- llama.cpp build ---------------------------------------------------------------------------------------------
LLAMA_CPP=""
cands=()
[[ -n "${ADAPTERKIT_LLAMA_CPP:-}" ]] && cands+=("$ADAPTERKIT_LLAMA_CPP")
cands+=("$HOME/.cache/adapterkit-reference/llama.cpp" "$HOME/.cache/adapterkit-gguf/llama.cpp-src")
for c in "${cands[@]}"; do
    if [[ -f "$c/build/bin/libllama.so" && -f "$c/include/llama.h" && -f "$c/ggml/include/ggml.h" && -d "$c/gguf-py" ]]; then
        LLAMA_CPP="$(cd "$c" && pwd)"; break
    fi
done
[[ -n "$LLAMA_CPP" ]] || die "no llama.cpp build found (need build/bin/libllama.so, include/llama.h, gguf-py/); tried: ${cands[*]}.
  Build one as fixtures/gguf/README.md describes (cmake -B build ... && cmake --build build --target llama-export-lora),
  or point ADAPTERKIT_LLAMA_CPP at an existing build."
LLAMA_BIN="$LLAMA_CPP/build/bin"

# ---- reference python -----------------------------------------------------------------------------------------
PY="${ADAPTERKIT_REFERENCE_PY:-$HOME/.cache/adapterkit-reference/venv/bin/python}"
[[ -x "$PY" ]] || die "reference python venv not found at $PY (set ADAPTERKIT_REFERENCE_PY; it needs torch, transformers, peft)"
"$PY" -c "import torch, transformers, peft, safetensors, numpy" 2>/dev/null \
    || die "$PY lacks one of torch, transformers, peft, safetensors, numpy"

# ---- fixtures ---------------------------------------------------------------------------------------------------
for f in manifest.json lora_logits.cpp base_f32.gguf base_f16.gguf base_q8_0.gguf base_hf/model.safetensors; do
    [[ -e "$FIX/$f" ]] || die "missing fixture $FIX/$f (regenerate with fixtures/gguf/generate.py)"
done

# ---- C++ compiler ---------------------------------------------------------------------------------------------------
CXX_BIN="${CXX:-$(command -v g++ || command -v c++ || true)}"
[[ -n "$CXX_BIN" ]] || die "no C++ compiler (g++/c++ or \$CXX) to build fixtures/gguf/lora_logits.cpp"

# ---- adapterkit -----------------------------------------------------------------------------------------------------
if [[ -n "${ADAPTERKIT_BIN:-}" ]]; then
    AK="$ADAPTERKIT_BIN"
else
    AK="$REPO/target/release/adapterkit"
    if [[ "${ADAPTERKIT_NO_BUILD:-0}" != 1 ]]; then
        echo "building adapterkit (cargo build --release -p adapterkit-cli)..." >&2
        (cd "$REPO" && cargo build --release -p adapterkit-cli -q) || die "cargo build failed"
    fi
fi
[[ -x "$AK" ]] || die "adapterkit binary not found at $AK (cargo build --release -p adapterkit-cli, or set ADAPTERKIT_BIN)"

# ---- temp dir + lora_logits ---------------------------------------------------------------------------------------
WORK="$(mktemp -d -t adapterkit-gguf-check-XXXXXX)"
if [[ "${ADAPTERKIT_KEEP_TMP:-0}" == 1 ]]; then
    echo "keeping temp dir $WORK" >&2
else
    trap 'rm -rf "$WORK"' EXIT
fi
"$CXX_BIN" -O1 -std=c++17 "$FIX/lora_logits.cpp" -I"$LLAMA_CPP/include" -I"$LLAMA_CPP/ggml/include" \
    -L"$LLAMA_BIN" -lllama -lggml -lggml-base -Wl,-rpath,"$LLAMA_BIN" -o "$WORK/lora_logits" \
    || die "could not compile fixtures/gguf/lora_logits.cpp against $LLAMA_BIN/libllama.so"

# ---- versions ---------------------------------------------------------------------------------------------------
COMMIT="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
DIRTY="$(git -C "$REPO" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null | wc -l | tr -d ' ')"
DIRTY_NOTE=""
if [[ "$DIRTY" != 0 ]]; then DIRTY_NOTE=" + $DIRTY uncommitted change(s) under crates/ or Cargo files"; fi
META="adapterkit: commit $COMMIT$DIRTY_NOTE; $("$AK" --version 2>&1 | head -1); binary $AK, built $(date -r "$AK" '+%F %T')
libllama.so sha256 $(sha256sum "$LLAMA_BIN/libllama.so" | cut -c1-16); compiler $("$CXX_BIN" --version | head -1)
host: $(uname -srm), $(nproc) cores"

mkdir -p "$RESULTS"
OUT="$RESULTS/gguf-llamacpp-$(date +%Y%m%d-%H%M%S).txt"

set +e
"$PY" "$REPO/scripts/gguf_llamacpp_check.py" --adapterkit "$AK" --lora-logits "$WORK/lora_logits" \
    --llama-cpp "$LLAMA_CPP" --fixtures "$FIX" --work "$WORK" --out "$OUT" --meta "$META"
rc=$?
set -e
exit "$rc"

#!/usr/bin/env bash
# End-to-end check of `adapterkit merge BASE_HF ADAPTER -o m.gguf --quant Q` on the tiny Llama of fixtures/gguf
# (not part of CI; about a minute on 2 cores).
#
#   scripts/gguf-quant-e2e.sh
#
# For each PEFT case (fixtures/gguf/<case>/adapter) and each Q:
#  1. `adapterkit merge fixtures/gguf/base_hf <case>/adapter -o m.gguf --quant Q`, run m.gguf in llama.cpp (libllama,
#     no adapter) and compare its logits with transformers running the UNMERGED PEFT model (f32).
#     Tolerances: f32 1e-5, f16 1e-2, q8_0 2e-2 (see the results file for the logit scale and llama.cpp's own error of
#     each weight type on the base model); other types are reported for information.
#  2. Byte comparison with the chain people run by hand: PEFT merge_and_unload() -> save_pretrained() (f32, as the
#     base) -> convert_hf_to_gguf.py --outtype f32 -> llama-quantize Q  (f16 and f32: convert_hf_to_gguf.py --outtype
#     f16/f32 directly). Every tensor's name, type, shape and bytes, and every KV's type and value; tensor and KV
#     order differences are reported as harmless.
#  3. Prints a summary and writes it to bench/results/gguf-quant-e2e-<date>.txt.
# The tiny model is 32 wide, so llama-quantize's k-quants fall back to 32-block types (q4_K -> q5_0, q6_K -> q8_0):
# q4_k_m checks adapterkit's type choice and fallback, not the k-quant kernels.
#
# Exit status: 0 all rows pass and every file matches the chain, 1 a check failed, 2 a prerequisite is missing.
#
# Needs (nothing is downloaded, llama.cpp is not rebuilt):
#   * llama.cpp source + build with build/bin/libllama.so and build/bin/llama-quantize: $ADAPTERKIT_LLAMA_CPP, else
#     the first of ~/.cache/adapterkit-reference/llama.cpp and ~/.cache/adapterkit-gguf/llama.cpp-src that has them
#   * the reference python venv: $ADAPTERKIT_REFERENCE_PY, else ~/.cache/adapterkit-reference/venv/bin/python
#     (torch, transformers, peft, safetensors, numpy, sentencepiece; gguf-py is taken from the llama.cpp tree)
#   * a C++ compiler ($CXX, else g++/c++) to compile fixtures/gguf/lora_logits.cpp against libllama
#   * the adapterkit binary: $ADAPTERKIT_BIN, else `cargo build --release -p adapterkit-cli` is run first
#     (set ADAPTERKIT_NO_BUILD=1 to use target/release/adapterkit as it is)
# Env: E2E_CASES=plain,dora,...  (default plain,patterns,rslora,embed_head,lora_bias,dora)
#      E2E_QUANTS=f32,f16,q8_0,q4_k_m  (any of f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k_{s,m,l} q4_k_{s,m}
#      q5_k_{s,m} q6_k)
#      E2E_F16_TOL / E2E_Q8_TOL  logit tolerances (default 1e-2 / 2e-2)
#      ADAPTERKIT_KEEP_TMP=1 keeps the temp dir (all GGUF files, logs) and prints its path.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FIX="$REPO/fixtures/gguf"
RESULTS="$REPO/bench/results"

die() { echo "gguf-quant-e2e: $*" >&2; exit 2; }

# ---- llama.cpp build ---------------------------------------------------------------------------------------------
LLAMA_CPP=""
cands=()
[[ -n "${ADAPTERKIT_LLAMA_CPP:-}" ]] && cands+=("$ADAPTERKIT_LLAMA_CPP")
cands+=("$HOME/.cache/adapterkit-reference/llama.cpp" "$HOME/.cache/adapterkit-gguf/llama.cpp-src")
for c in "${cands[@]}"; do
    if [[ -f "$c/build/bin/libllama.so" && -x "$c/build/bin/llama-quantize" && -f "$c/include/llama.h" \
          && -f "$c/ggml/include/ggml.h" && -d "$c/gguf-py" && -f "$c/convert_hf_to_gguf.py" ]]; then
        LLAMA_CPP="$(cd "$c" && pwd)"; break
    fi
done
[[ -n "$LLAMA_CPP" ]] || die "no llama.cpp build found (need build/bin/libllama.so, build/bin/llama-quantize,
  include/llama.h, gguf-py/, convert_hf_to_gguf.py); tried: ${cands[*]}. Build one as fixtures/gguf/README.md describes,
  or point ADAPTERKIT_LLAMA_CPP at an existing build."
LLAMA_BIN="$LLAMA_CPP/build/bin"

# ---- reference python -----------------------------------------------------------------------------------------
PY="${ADAPTERKIT_REFERENCE_PY:-$HOME/.cache/adapterkit-reference/venv/bin/python}"
[[ -x "$PY" ]] || die "reference python venv not found at $PY (set ADAPTERKIT_REFERENCE_PY; it needs torch, transformers, peft)"
"$PY" -c "import torch, transformers, peft, safetensors, numpy, sentencepiece" 2>/dev/null \
    || die "$PY lacks one of torch, transformers, peft, safetensors, numpy, sentencepiece"

# ---- fixtures ---------------------------------------------------------------------------------------------------
for f in manifest.json lora_logits.cpp base_f32.gguf base_hf/model.safetensors base_hf/tokenizer.model; do
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
"$AK" merge --help 2>/dev/null | grep -q -- '--quant' || die "$AK merge has no --quant option (too old?)"

# ---- temp dir + lora_logits ---------------------------------------------------------------------------------------
WORK="$(mktemp -d -t adapterkit-gguf-quant-XXXXXX)"
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
libllama.so sha256 $(sha256sum "$LLAMA_BIN/libllama.so" | cut -c1-16), llama-quantize sha256 $(sha256sum "$LLAMA_BIN/llama-quantize" | cut -c1-16); compiler $("$CXX_BIN" --version | head -1)
host: $(uname -srm), $(nproc) cores"

mkdir -p "$RESULTS"
OUT="$RESULTS/gguf-quant-e2e-$(date +%Y%m%d-%H%M%S).txt"

set +e
"$PY" "$REPO/scripts/gguf_quant_e2e.py" --adapterkit "$AK" --lora-logits "$WORK/lora_logits" \
    --llama-cpp "$LLAMA_CPP" --fixtures "$FIX" --work "$WORK" --out "$OUT" --meta "$META" \
    --cases "${E2E_CASES:-plain,patterns,rslora,embed_head,lora_bias,dora}" \
    --quants "${E2E_QUANTS:-f32,f16,q8_0,q4_k_m}" --bf16-quants "${E2E_BF16_QUANTS-bf16,f16,q8_0,q4_k_m}" \
    --f16-tol "${E2E_F16_TOL:-1e-2}" --q8-tol "${E2E_Q8_TOL:-2e-2}"
rc=$?
set -e
exit "$rc"

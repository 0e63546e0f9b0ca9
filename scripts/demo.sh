#!/usr/bin/env bash
# The README's first set-up command: build adapterkit, merge a DoRA adapter that PEFT trained on a
# tiny Llama (shipped in fixtures/), show what was written, and compare it with what PEFT's own
# merge_and_unload produced for the same files.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p adapterkit-cli
bin=target/release/adapterkit
out=target/demo-merged
f=fixtures/peft
echo "== adapterkit inspect $f/llama_dora/adapter"
"$bin" inspect "$f/llama_dora/adapter"
echo
echo "== adapterkit merge $f/bases/llama $f/llama_dora/adapter -o $out"
"$bin" merge "$f/bases/llama" "$f/llama_dora/adapter" -o "$out" --force
echo
echo "== adapterkit inspect $out"
"$bin" inspect "$out"
echo
echo "== adapterkit diff $out $f/llama_dora/merged.safetensors   (PEFT 0.21.2 merge_and_unload)"
"$bin" diff "$out" "$f/llama_dora/merged.safetensors" --tolerance 1e-5

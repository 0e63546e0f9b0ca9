#!/usr/bin/env python3
"""Generate a random TinyLlama-1.1B-shaped BF16 checkpoint plus a rank-16 PEFT LoRA adapter.

Usage:
    python3 bench/gen_tinyllama.py OUTDIR [--layers N] [--shards K] [--seed S]

Writes:
    OUTDIR/base/      Hugging Face model directory: config.json, generation_config.json,
                      model-0000k-of-0000K.safetensors (BF16), model.safetensors.index.json
    OUTDIR/adapter/   PEFT LoRA adapter: adapter_config.json, adapter_model.safetensors (F32)
    OUTDIR/GENERATED.json  written last; its presence means the generation completed.

Only python3 + numpy are needed (no torch). The safetensors files are written by hand and the
tensor data is streamed in chunks, so the generator's memory stays small (~100 MB) even though
the full checkpoint is ~2.2 GB.

BF16 values are the upper 16 bits (truncation) of float32 samples of N(0, 1) * 0.02; the RMSNorm
weights are 1 + N(0, 1) * 0.02. Generation is deterministic for a given --seed.
"""

import argparse
import json
import os
import struct
import sys
import time

import numpy as np

# TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-Chat-v1.0) hyperparameters.
HIDDEN = 2048
INTERMEDIATE = 5632
NUM_LAYERS = 22
NUM_HEADS = 32
NUM_KV_HEADS = 4
HEAD_DIM = HIDDEN // NUM_HEADS  # 64
KV_DIM = NUM_KV_HEADS * HEAD_DIM  # 256
VOCAB = 32000

LORA_R = 16
LORA_ALPHA = 32
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Elements generated per chunk: 8 Mi float32 samples = 32 MiB (+ temporaries).
CHUNK_ELEMS = 8 * 1024 * 1024

DTYPE_SIZES = {"BF16": 2, "F32": 4}


def linear_shapes():
    """(module name, parent, (out_features, in_features)) for the seven projections of a layer."""
    return [
        ("q_proj", "self_attn", (HIDDEN, HIDDEN)),
        ("k_proj", "self_attn", (KV_DIM, HIDDEN)),
        ("v_proj", "self_attn", (KV_DIM, HIDDEN)),
        ("o_proj", "self_attn", (HIDDEN, HIDDEN)),
        ("gate_proj", "mlp", (INTERMEDIATE, HIDDEN)),
        ("up_proj", "mlp", (INTERMEDIATE, HIDDEN)),
        ("down_proj", "mlp", (HIDDEN, INTERMEDIATE)),
    ]


def base_tensors(num_layers):
    """Base checkpoint tensors in Hugging Face state_dict order: (name, shape, kind)."""
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN), "weight")]
    for i in range(num_layers):
        for mod, parent, shape in linear_shapes():
            out.append((f"model.layers.{i}.{parent}.{mod}.weight", shape, "weight"))
        out.append((f"model.layers.{i}.input_layernorm.weight", (HIDDEN,), "norm"))
        out.append((f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,), "norm"))
    out.append(("model.norm.weight", (HIDDEN,), "norm"))
    out.append(("lm_head.weight", (VOCAB, HIDDEN), "weight"))
    return out


def adapter_tensors(num_layers):
    """PEFT adapter tensors: (name, shape, kind) with lora_A (r, in) and lora_B (out, r)."""
    out = []
    for i in range(num_layers):
        for mod, parent, (out_f, in_f) in linear_shapes():
            prefix = f"base_model.model.model.layers.{i}.{parent}.{mod}"
            out.append((f"{prefix}.lora_A.weight", (LORA_R, in_f), f"lora_A:{in_f}"))
            out.append((f"{prefix}.lora_B.weight", (out_f, LORA_R), "lora_B"))
    return out


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def safetensors_header(entries, dtype):
    """Build the padded JSON header for tensors laid out contiguously in the given order."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _kind in entries:
        nbytes = numel(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)  # pad with spaces to a multiple of 8 bytes
    return raw, offset


def bf16_chunks(rng, n, kind):
    """Yield uint16 arrays holding BF16 bit patterns, CHUNK_ELEMS at a time."""
    left = n
    while left > 0:
        m = min(left, CHUNK_ELEMS)
        x = rng.standard_normal(m, dtype=np.float32)
        x *= np.float32(0.02)
        if kind == "norm":
            x += np.float32(1.0)
        # bf16 = upper 16 bits of the float32 bit pattern (truncation), little-endian on disk.
        yield (x.view(np.uint32) >> 16).astype("<u2")
        left -= m


def f32_chunks(rng, n, kind):
    """Yield little-endian float32 arrays for LoRA factors, CHUNK_ELEMS at a time.

    lora_A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform-like, as PEFT initialises it);
    lora_B ~ N(0, 0.02) -- non-zero (PEFT initialises B to zero, i.e. a trained adapter is
    assumed), sized so that the merged delta (alpha/r = 2) is visible at BF16 resolution.
    """
    left = n
    while left > 0:
        m = min(left, CHUNK_ELEMS)
        if kind.startswith("lora_A"):
            bound = 1.0 / np.sqrt(float(kind.split(":")[1]))
            x = rng.uniform(-bound, bound, m).astype(np.float32)
        else:
            x = rng.standard_normal(m, dtype=np.float32)
            x *= np.float32(0.02)
        yield x.astype("<f4", copy=False)
        left -= m


def write_safetensors(path, entries, dtype, rng):
    header, data_len = safetensors_header(entries, dtype)
    gen = bf16_chunks if dtype == "BF16" else f32_chunks
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        written = 0
        for _name, shape, kind in entries:
            for chunk in gen(rng, numel(shape), kind):
                f.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
    assert written == data_len, (written, data_len)
    os.replace(tmp, path)
    return 8 + len(header) + data_len


def split_shards(entries, num_shards):
    """Split tensors, in order, into num_shards contiguous groups of roughly equal byte size."""
    sizes = [numel(shape) * 2 for _n, shape, _k in entries]
    total = sum(sizes)
    num_shards = max(1, min(num_shards, len(entries)))
    shards, cur, acc = [], [], 0
    for entry, size in zip(entries, sizes):
        target = total * (len(shards) + 1) / num_shards
        # Close the current shard when adding this tensor would overshoot the target by more
        # than stopping short does (and shards remain to be filled).
        if cur and len(shards) < num_shards - 1 and acc + size - target > target - acc:
            shards.append(cur)
            cur = []
        cur.append(entry)
        acc += size
    shards.append(cur)
    return shards, total


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def config_json(num_layers):
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": NUM_KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.35.0",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def generation_config_json():
    return {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "max_length": 2048,
        "pad_token_id": 0,
        "transformers_version": "4.35.0",
    }


def adapter_config_json(base_dir):
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_dir,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": LORA_R,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(TARGET_MODULES),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def human(nbytes):
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", help="output directory (base/ and adapter/ are created inside)")
    ap.add_argument("--layers", type=int, default=NUM_LAYERS, help="decoder layers (default 22)")
    ap.add_argument("--shards", type=int, default=2,
                    help="number of base safetensors shards (default 2, ~1.1 GB each at 22 layers)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error("--layers must be >= 1")
    if args.shards < 1:
        ap.error("--shards must be >= 1")

    t0 = time.monotonic()
    outdir = os.path.abspath(args.outdir)
    base_dir = os.path.join(outdir, "base")
    adapter_dir = os.path.join(outdir, "adapter")
    os.makedirs(base_dir, exist_ok=True)
    os.makedirs(adapter_dir, exist_ok=True)
    marker = os.path.join(outdir, "GENERATED.json")
    if os.path.exists(marker):
        os.remove(marker)

    rng = np.random.default_rng(args.seed)

    # --- base checkpoint ---
    entries = base_tensors(args.layers)
    shards, total_size = split_shards(entries, args.shards)
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        size = write_safetensors(os.path.join(base_dir, fname), shard, "BF16", rng)
        for name, _shape, _kind in shard:
            weight_map[name] = fname
        print(f"  {fname}: {len(shard)} tensors, {human(size)}", file=sys.stderr)
    # Remove stale shards from a previous run with a different shard count.
    keep = set(weight_map.values())
    for f in os.listdir(base_dir):
        if f.startswith("model-") and f.endswith(".safetensors") and f not in keep:
            os.remove(os.path.join(base_dir, f))
    write_json(os.path.join(base_dir, "model.safetensors.index.json"),
               {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    write_json(os.path.join(base_dir, "config.json"), config_json(args.layers))
    write_json(os.path.join(base_dir, "generation_config.json"), generation_config_json())

    # --- LoRA adapter ---
    a_entries = adapter_tensors(args.layers)
    a_size = write_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"),
                               a_entries, "F32", rng)
    write_json(os.path.join(adapter_dir, "adapter_config.json"), adapter_config_json(base_dir))
    print(f"  adapter_model.safetensors: {len(a_entries)} tensors, {human(a_size)}", file=sys.stderr)

    elapsed = time.monotonic() - t0
    write_json(marker, {
        "layers": args.layers, "shards": n, "seed": args.seed,
        "base_tensors": len(entries), "base_total_size": total_size,
        "adapter_tensors": len(a_entries), "seconds": round(elapsed, 1),
    })
    print(f"generated {outdir} ({args.layers} layers, {len(entries)} base tensors, "
          f"{human(total_size)} data) in {elapsed:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()

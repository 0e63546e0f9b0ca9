#!/usr/bin/env python3
"""Regenerate the committed seed corpora under fuzz/seeds/<target>/ from fixtures/.

Run from the repository root: python3 fuzz/seeds/make_seeds.py
Standard library only. Each target gets a handful of small inputs (all under 64 KiB).
"""
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
FX = os.path.join(ROOT, "fixtures")


def fx(p):
    return os.path.join(FX, p)


def put(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(p):
    with open(fx(p), "rb") as f:
        return f.read()


SAFETENSORS_FILES = {
    "clean_lora": "check/clean/adapter_model.safetensors",
    "llama_lora": "peft/llama_lora/adapter/adapter_model.safetensors",
    "bf16_all": "check/bf16_all/adapter_model.safetensors",
    "conv_lora": "peft/conv_lora/adapter/adapter_model.safetensors",
    "mixed_dtypes": "check/mixed_dtypes/adapter_model.safetensors",
    "huge_shape_small_data": "malformed/huge_shape_small_data.safetensors",
    "offsets_reversed": "malformed/offsets_reversed.safetensors",
    "metadata_not_strings": "malformed/metadata_not_strings.safetensors",
    "header_len_too_large": "malformed/header_len_too_large.safetensors",
}

CHECK_FILES = {
    "clean_lora": "check/clean/adapter_model.safetensors",
    "nan_values": "check/nan_values/adapter_model.safetensors",
    "mixed_dtypes": "check/mixed_dtypes/adapter_model.safetensors",
    "kohya_hash_ok": "check/kohya_hash_ok.safetensors",
    "kohya_hash_bad": "check/kohya_hash_bad.safetensors",
    "modelspec_incomplete": "check/modelspec_incomplete.safetensors",
    "duplicate_names": "check/duplicate_names.safetensors",
    "trailing_bytes": "check/trailing_bytes.safetensors",
}

CONFIGS = {
    "clean_lora": "check/clean/adapter_config.json",
    "llama_lora": "peft/llama_lora/adapter/adapter_config.json",
    "llama_dora": "peft/llama_dora/adapter/adapter_config.json",
    "rslora_bias": "peft/llama_rslora_bias/adapter/adapter_config.json",
    "rank_pattern_lies": "check/rank_pattern_lies/adapter_config.json",
    "newer_field": "check/newer_field/adapter_config.json",
    "unknown_field": "check/unknown_field/adapter_config.json",
    "utf8_bom": "malformed/config_utf8_bom/adapter_config.json",
    "loha": "peft_families/llama_loha/adapter/adapter_config.json",
    "lokr": "peft_families/llama_lokr/adapter/adapter_config.json",
    "adalora": "peft_families/llama_adalora/adapter/adapter_config.json",
    "ia3": "peft_families/llama_ia3/adapter/adapter_config.json",
}


def header_seed(data):
    """safetensors_header input: 8-byte x (even: data section length << 1), then the JSON."""
    n = struct.unpack("<Q", data[:8])[0]
    json = data[8 : 8 + n]
    data_len = len(data) - 8 - n
    return struct.pack("<Q", (data_len % 65536) << 1) + json


# adapter_names: see the input layout in fuzz_targets/adapter_names.rs.
Q, K, V = 0, 1, 2
EMBED, LM_HEAD = 9, 10
LORA_A, LORA_B, LORA_B_BIAS, EMB_A, EMB_B, MAG = 0, 1, 4, 5, 6, 7
FULL_WEIGHT = 10
HADA = [17, 18, 19, 20]


def t(module, suffix, layer=0, prefix=True, dtype=0, shape=None):
    out = [0 if prefix else 1, module | (layer << 7), suffix, dtype]
    if shape is None:
        out.append(0)
    elif len(shape) <= 2:
        out.append(1 if len(shape) == 2 else 2)
        out.extend(shape)
    else:
        out.append(0x80 + (len(shape) - 1 - 0x80 % 5) % 5)
        out.extend(shape)
    return out


def names_seed(peft=0, flags=0, r=0, alpha=0, seed=7, targets=(), rank_pattern=(),
               alpha_pattern=(), extra=(), tensors=()):
    b = [peft, flags, r, alpha, seed, len(targets)]
    b += list(targets)
    b.append(len(rank_pattern))
    for k, v in rank_pattern:
        b += [k, v]
    b.append(len(alpha_pattern))
    for k, v in alpha_pattern:
        b += [k, v]
    b += list(extra)
    b.append(len(tensors))
    for x in tensors:
        b += x
    return bytes(b)


def lora_pairs(modules=(Q, V), layers=(0, 1), dtype=0, extra_suffixes=()):
    out = []
    for layer in layers:
        for m in modules:
            for s in (LORA_A, LORA_B) + tuple(extra_suffixes):
                out.append(t(m, s, layer=layer, dtype=dtype))
    return out


def main():
    for name, p in SAFETENSORS_FILES.items():
        put("safetensors_file", name, read(p))
    for name, p in CHECK_FILES.items():
        put("check_file", name, read(p))
    for name, p in CONFIGS.items():
        put("adapter_config", name, read(p))
    for name in ["clean_lora", "llama_lora", "mixed_dtypes", "huge_shape_small_data",
                 "metadata_not_strings"]:
        put("safetensors_header", name, header_seed(read(SAFETENSORS_FILES[name])))
    put("safetensors_header", "empty_object", struct.pack("<Q", 0) + b"{}")
    put("safetensors_header", "metadata_only",
        struct.pack("<Q", 0) + b'{"__metadata__":{"format":"pt"}}   ')

    put("adapter_names", "clean_lora", names_seed(tensors=lora_pairs()))
    put("adapter_names", "dora", names_seed(flags=1, tensors=lora_pairs(extra_suffixes=(MAG,))))
    put("adapter_names", "bias_bf16",
        names_seed(flags=2, tensors=lora_pairs(dtype=2, extra_suffixes=(LORA_B_BIAS,))))
    put("adapter_names", "embedding",
        names_seed(targets=[10], tensors=[t(EMBED, EMB_A), t(EMBED, EMB_B)]))
    put("adapter_names", "rank_pattern",
        names_seed(targets=[0], rank_pattern=[(0, 2)], alpha_pattern=[(0, 16)],
                   tensors=[t(Q, LORA_A, shape=[2, 32]), t(Q, LORA_B, shape=[32, 2])]))
    put("adapter_names", "regex_layers",
        names_seed(flags=64 | 16, targets=[14], extra=[1],
                   tensors=lora_pairs(layers=(1,), dtype=1)))
    put("adapter_names", "loha",
        names_seed(peft=4, targets=[0], tensors=[t(Q, s) for s in HADA]))
    # Other families, one module each, small plausible shapes (their builders mostly refuse or
    # accept them; the point is to reach each builder and the planner's checks).
    put("adapter_names", "oft", names_seed(peft=9, targets=[0], tensors=[t(Q, 26, shape=[8, 6])]))
    put("adapter_names", "hra", names_seed(peft=10, targets=[0], tensors=[t(Q, 27, shape=[32, 4])]))
    put("adapter_names", "lokr",
        names_seed(peft=5, targets=[0], tensors=[t(Q, 21, shape=[2, 2]), t(Q, 22, shape=[16, 16])]))
    put("adapter_names", "ia3", names_seed(peft=6, targets=[0], tensors=[t(Q, 23, shape=[32, 1])]))
    put("adapter_names", "conv_shaped_lora",
        names_seed(targets=[0], tensors=[t(Q, LORA_A, shape=[4, 32, 1, 1]),
                                         t(Q, LORA_B, shape=[32, 4, 1, 1])]))
    put("adapter_names", "boft",
        names_seed(peft=12, targets=[0], tensors=[t(Q, 36, shape=[1, 8, 4, 4]), t(Q, 37, shape=[1, 32])]))
    put("adapter_names", "lokr_tucker",
        names_seed(peft=5, targets=[0], tensors=[t(Q, 21, shape=[2, 2]), t(Q, 42, shape=[4, 4, 1, 1]),
                                                 t(Q, 40, shape=[4, 16]), t(Q, 41, shape=[4, 16])]))
    # A zero-element tensor may have huge other dimensions (0xF0.. picks BIG in the target).
    put("adapter_names", "lora_zero_dim_big",
        names_seed(targets=[0], tensors=[t(Q, LORA_A, shape=[4, 0]), t(Q, LORA_B, shape=[0, 4]),
                                         t(K, LORA_A, shape=[0, 0xF0])]))
    put("adapter_names", "modules_to_save",
        names_seed(tensors=lora_pairs(layers=(0,)) + [t(LM_HEAD, FULL_WEIGHT)]))


if __name__ == "__main__":
    main()

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


GGUF_FILES = {
    "all_types": "gguf/container/all_types.gguf",
    "extra_types": "gguf/container/extra_types.gguf",
    "nested_array": "gguf/container/nested_array.gguf",
    "adapter_f32": "gguf/plain/adapter_f32.gguf",
    "adapter_q8_0": "gguf/plain/adapter_q8_0.gguf",
    "embed_head_f16": "gguf/embed_head/adapter_f16.gguf",
}

# adapter_formats: a mode byte, then the file. Even: a lone file through convert::detect/open.
FORMAT_FILES = {
    "lycoris_lokr": "lycoris/lokr/adapter.safetensors",
    "lycoris_lokr_tucker": "lycoris/lokr_tucker/adapter.safetensors",
    "lycoris_ia3": "lycoris/ia3/adapter.safetensors",
    "lycoris_diag_oft_rescale": "lycoris/diag_oft_rescale/adapter.safetensors",
    "lycoris_boft_constraint": "lycoris/boft_constraint/adapter.safetensors",
    "lycoris_locon_tucker": "lycoris/locon_tucker/adapter.safetensors",
    "lycoris_locon_dora": "lycoris/locon_dora/adapter.safetensors",
    "lycoris_locon_train_norm": "lycoris/locon_train_norm/adapter.safetensors",
    "lycoris_glora": "lycoris/glora/adapter.safetensors",
    "lycoris_loha_tucker": "lycoris/loha_tucker/adapter.safetensors",
    "lycoris_full": "lycoris/full/adapter.safetensors",
    "kohya_sd_lora": "kohya_sd/lycoris_lora_te_flat/lora.safetensors",
    "flux_kohya_qkv_linear1": "flux/kohya_qkv_linear1/kohya_lora.safetensors",
    "flux_kohya_default": "flux/kohya_default/kohya_lora.safetensors",
    "flux_diffusers": "flux/diffusers_peft/pytorch_lora_weights.safetensors",
    "gguf_embed_head_f16": "gguf/embed_head/adapter_f16.gguf",
}
# Odd mode byte 2k+1: adapters.safetensors beside MLX_CONFIGS[k] of the target.
MLX_FILES = {
    "mlx_lora_default": (0, "mlx/lora_default/adapters/adapters.safetensors"),
    "mlx_dora": (1, "mlx/dora/adapters/adapters.safetensors"),
    "mlx_full": (2, "mlx/full/adapters/adapters.safetensors"),
    "mlx_lora_toplevel": (3, "mlx/lora_toplevel/adapters/adapters.safetensors"),
    "mlx_dora_embed": (4, "mlx/dora_embed/adapters/adapters.safetensors"),
}


def st_file(tensors, meta=None):
    """A small safetensors file: tensors = [(name, shape)] as F32 (values 0.01, 0.02, …), or
    (name, shape, dtype, raw bytes)."""
    import json
    header, data = {}, b""
    if meta is not None:
        header["__metadata__"] = meta
    for t in tensors:
        if len(t) == 2:
            name, shape = t
            n = 1
            for d in shape:
                n *= d
            raw = struct.pack("<%df" % n, *[0.01 * (i + 1) for i in range(n)])
            dtype = "F32"
        else:
            name, shape, dtype, raw = t
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    j = json.dumps(header, separators=(",", ":")).encode()
    j += b" " * (-len(j) % 8)
    return struct.pack("<Q", len(j)) + j + data


def scalar(name, v=4.0):
    return (name, [], "F32", struct.pack("<f", v))


# adapter_formats: tiny synthetic files, one module of each kind a reader builds (small inputs
# mutate faster than the fixtures).
TINY_FORMATS = {
    "tiny_kohya_lora": [("lora_unet_x.lora_down.weight", [2, 4]),
                        ("lora_unet_x.lora_up.weight", [4, 2]), scalar("lora_unet_x.alpha")],
    "tiny_locon_tucker": [("lycoris_x.lora_down.weight", [2, 4, 1, 1]),
                          ("lycoris_x.lora_mid.weight", [2, 2, 3, 3]),
                          ("lycoris_x.lora_up.weight", [4, 2, 1, 1]), scalar("lycoris_x.alpha")],
    "tiny_locon_dora": [("lycoris_x.lora_down.weight", [2, 4]),
                        ("lycoris_x.lora_up.weight", [4, 2]),
                        ("lycoris_x.dora_scale", [4, 1]), scalar("lycoris_x.alpha")],
    "tiny_loha": [("lycoris_x.hada_w1_a", [4, 2]), ("lycoris_x.hada_w1_b", [2, 4]),
                  ("lycoris_x.hada_w2_a", [4, 2]), ("lycoris_x.hada_w2_b", [2, 4]),
                  scalar("lycoris_x.alpha")],
    "tiny_lokr": [("lycoris_x.lokr_w1", [2, 2]), ("lycoris_x.lokr_w2_a", [2, 1]),
                  ("lycoris_x.lokr_w2_b", [1, 2]), scalar("lycoris_x.alpha", 1.0)],
    "tiny_ia3": [("lycoris_x.weight", [4]), ("lycoris_x.on_input", [], "BOOL", b"\x01")],
    "tiny_diff_norm": [("lycoris_x.diff", [4, 4]), ("lycoris_x.diff_b", [4]),
                       ("lycoris_y.w_norm", [4]), ("lycoris_y.b_norm", [4])],
    "tiny_glora": [("lycoris_x.a1.weight", [4, 2]), ("lycoris_x.a2.weight", [2, 4]),
                   ("lycoris_x.b1.weight", [4, 2]), ("lycoris_x.b2.weight", [2, 4]),
                   scalar("lycoris_x.alpha", 2.0)],
    "tiny_diag_oft": [("lycoris_x.oft_blocks", [2, 2, 2]), ("lycoris_x.rescale", [4, 1]),
                      scalar("lycoris_x.alpha", 0.5)],
    "tiny_boft": [("lycoris_x.oft_blocks", [2, 2, 2, 2]), ("lycoris_x.rescale", [4]),
                  scalar("lycoris_x.alpha", 0.5)],
}
TINY_DIFFUSERS_META = {"lora_adapter_metadata": '{"unet.r": 2, "unet.lora_alpha": 4, '
                       '"unet.use_rslora": false, "unet.alpha_pattern": {"y": 2}}'}
TINY_MLX = {
    "tiny_mlx_lora": (0, [("model.layers.0.q_proj.lora_a", [4, 4]),
                          ("model.layers.0.q_proj.lora_b", [4, 4])]),
    "tiny_mlx_dora": (1, [("model.layers.0.q_proj.lora_a", [4, 4]),
                          ("model.layers.0.q_proj.lora_b", [4, 4]),
                          ("model.layers.0.q_proj.m", [4])]),
    "tiny_mlx_full": (2, [("model.layers.0.q_proj.weight", [2, 2])]),
    "tiny_mlx_embed": (3, [("model.embed_tokens.lora_a", [8, 2]),
                           ("model.embed_tokens.lora_b", [2, 4])]),
}


def gguf_file(kv, tensors, align=32):
    """A small GGUF v3 file: kv = [(key, type id, packed value)], tensors = [(name, ne, ggml type
    id, raw bytes)], packed in order at `align`."""
    def gstr(x):
        return struct.pack("<Q", len(x.encode())) + x.encode()
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, t, v in kv:
        out += gstr(k) + struct.pack("<I", t) + v
    rel = 0
    for name, ne, ty, raw in tensors:
        out += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", ty, rel)
        rel += len(raw) + (-len(raw) % align)
    out += b"\0" * (-len(out) % align)
    for _, _, _, raw in tensors:
        out += raw + b"\0" * (-len(raw) % align)
    return out


def gguf_tiny_adapter():
    """A GGUF LoRA: an F32 pair, a Q4_0/Q5_1 pair (32 elements each), a token_embd pair."""
    def gstr(x):
        return struct.pack("<Q", len(x)) + x.encode()
    kv = [("general.architecture", 8, gstr("llama")), ("general.type", 8, gstr("adapter")),
          ("adapter.type", 8, gstr("lora")), ("adapter.lora.alpha", 6, struct.pack("<f", 8.0))]
    f32 = lambda n: struct.pack("<%df" % n, *[0.01 * (i + 1) for i in range(n)])
    q4_0 = struct.pack("<e", 0.5) + bytes(range(16))
    q5_1 = struct.pack("<ee", 0.5, -1.0) + struct.pack("<I", 0xA5A5A5A5) + bytes(range(16, 32))
    tensors = [("blk.0.attn_q.weight.lora_a", [4, 2], 0, f32(8)),
               ("blk.0.attn_q.weight.lora_b", [2, 4], 0, f32(8)),
               ("blk.0.ffn_up.weight.lora_a", [32, 1], 2, q4_0),
               ("blk.0.ffn_up.weight.lora_b", [1, 32], 0, f32(32)),
               ("blk.0.ffn_down.weight.lora_a", [32, 1], 7, q5_1),
               ("blk.0.ffn_down.weight.lora_b", [1, 32], 0, f32(32)),
               ("token_embd.weight.lora_a", [2, 8], 0, f32(16)),
               ("token_embd.weight.lora_b", [2, 4], 0, f32(8))]
    return gguf_file(kv, tensors)


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
    for name, p in GGUF_FILES.items():
        put("gguf_file", name, read(p))
    put("gguf_file", "tiny_adapter_mixed", gguf_tiny_adapter())
    for name, p in FORMAT_FILES.items():
        put("adapter_formats", name, b"\x00" + read(p))
    for name, (k, p) in MLX_FILES.items():
        put("adapter_formats", name, bytes([2 * k + 1]) + read(p))
    for name, tensors in TINY_FORMATS.items():
        put("adapter_formats", name, b"\x00" + st_file(tensors))
    put("adapter_formats", "tiny_diffusers",
        b"\x00" + st_file([("unet.x.lora_A.weight", [2, 4]), ("unet.x.lora_B.weight", [4, 2]),
                           ("unet.y.lora.down.weight", [2, 4]), ("unet.y.lora.up.weight", [4, 2]),
                           ("unet.y.lora_magnitude_vector", [4])], TINY_DIFFUSERS_META))
    for name, (k, tensors) in TINY_MLX.items():
        put("adapter_formats", name, bytes([2 * k + 1]) + st_file(tensors))
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

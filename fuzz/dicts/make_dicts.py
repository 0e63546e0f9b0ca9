#!/usr/bin/env python3
"""Regenerate the libFuzzer dictionaries in fuzz/dicts/ (standard library only).

Run from anywhere: python3 fuzz/dicts/make_dicts.py
"""
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "fuzz", "dicts")


def pairs(x):
    if isinstance(x, list):
        return [p[0] for p in x if isinstance(p, list) and p]
    if isinstance(x, dict):
        return list(x.keys())
    return []


def main():
    v = json.load(open(os.path.join(ROOT, "formats", "peft_config_fields.json")))
    keys = set(pairs(v.get("base")))
    for c in v.get("tuners", {}).values():
        keys.update(pairs(c.get("fields")))
        keys.update(pairs(c.get("removed")))
    src = open(os.path.join(ROOT, "crates", "adapterkit-formats", "src", "peft.rs")).read()
    known = src.split("pub const KNOWN_PEFT_TYPES")[1].split("];")[0]
    types = re.findall(r'^\s+"([A-Z_0-9]+)",$', known, re.M)
    with open(os.path.join(OUT, "adapter_config.dict"), "w") as f:
        f.write("# libFuzzer dictionary for adapter_config: PEFT config keys "
                "(formats/peft_config_fields.json),\n# peft_type values and module names of the "
                "fixed base. Regenerate with fuzz/dicts/make_dicts.py.\n")
        for k in sorted(keys):
            f.write('"\\"%s\\":"\n' % k)
        for t in types:
            f.write('"\\"%s\\""\n' % t)
        for m in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "embed_tokens", "lm_head", "all-linear", "model.layers.0.self_attn.q_proj",
                  "layers", ".*"]:
            f.write('"\\"%s\\""\n' % m)
        for s in ["null", "true", "false", "[]", "{}", "-1", "1e309", "0.5",
                  "18446744073709551616"]:
            f.write('"%s"\n' % s)
    with open(os.path.join(OUT, "safetensors.dict"), "w") as f:
        f.write("# libFuzzer dictionary for the safetensors targets: header keys, dtype names, "
                "metadata keys.\n# Regenerate with fuzz/dicts/make_dicts.py.\n")
        for k in ["dtype", "shape", "data_offsets", "__metadata__", "format", "pt",
                  "sshs_model_hash", "modelspec.sai_model_spec", "modelspec.architecture",
                  "modelspec.implementation", "modelspec.title"]:
            f.write('"\\"%s\\""\n' % k)
        for d in ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3",
                  "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32",
                  "U32", "F32", "C64", "F64", "I64", "U64"]:
            f.write('"\\"%s\\""\n' % d)
        for s in ["18446744073709551615", "4294967296", "[0,0]", "[]", "NaN"]:
            f.write('"%s"\n' % s)

    write_gguf_dict()
    write_formats_dict()


def esc(b):
    """A libFuzzer dictionary entry for the bytes b."""
    out = []
    for c in b:
        if 0x20 <= c < 0x7F and c not in (0x22, 0x5C):
            out.append(chr(c))
        else:
            out.append("\\x%02x" % c)
    return '"' + "".join(out) + '"'


def u32(v):
    return v.to_bytes(4, "little")


def u64(v):
    return v.to_bytes(8, "little")


def rust_strings(path, const, pattern=r'"([^"]+)"'):
    """The string literals of `const NAME: &[&str] = &[ ... ];` in path (`pattern` picks them)."""
    src = open(os.path.join(ROOT, path)).read()
    body = src.split(const)[1].split("];")[0]
    return re.findall(pattern, body)


def write_gguf_dict():
    """GGUF: magic and versions, metadata value type ids, ggml type ids, common keys (bare and
    as GGUF strings: u64 length + bytes), tensor name parts and boundary dimensions."""
    gguf = open(os.path.join(ROOT, "crates", "adapterkit-formats", "src", "gguf.rs")).read()
    ggml_ids = sorted({int(i) for i in re.findall(r"\(GgmlType::\w+, (\d+),", gguf)})
    keys = ["general.architecture", "general.type", "general.alignment", "general.name",
            "adapter.type", "adapter.lora.alpha", "llama.block_count", "tokenizer.ggml.tokens"]
    strings = ["adapter", "lora", "model", "llama", "control_vector",
               "token_embd.weight.lora_a", "token_embd.weight.lora_b",
               "blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "output.weight.lora_a",
               "blk.0.attn_norm.weight", ".weight", ".lora_a", ".lora_b"]
    with open(os.path.join(OUT, "gguf.dict"), "w") as f:
        f.write("# libFuzzer dictionary for gguf_file (and adapter_formats): GGUF magic, versions, "
                "type ids,\n# keys and tensor names. Regenerate with fuzz/dicts/make_dicts.py.\n")
        f.write(esc(b"GGUF") + "\n")
        f.write(esc(b"GGUF" + u32(3)) + "\n")
        f.write(esc(b"GGUF" + u32(2)) + "\n")
        for v in range(13):  # metadata value types, u32
            f.write(esc(u32(v)) + "\n")
        for v in ggml_ids:  # ggml tensor types, u32 (0 and 1 already above)
            if v > 12:
                f.write(esc(u32(v)) + "\n")
        f.write(esc(u32(9) + u32(8)) + "\n")  # ARRAY of STRING
        f.write(esc(u32(9) + u32(9)) + "\n")  # ARRAY of ARRAY
        for k in keys + strings:
            b = k.encode()
            f.write(esc(b) + "\n")
            f.write(esc(u64(len(b)) + b) + "\n")
        for v in [0, 1, 2, 32, 256, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]:
            f.write(esc(u64(v)) + "\n")


def write_formats_dict():
    """adapter_formats: the safetensors words plus kohya/LyCORIS prefixes and suffixes, diffusers
    components and roles, mlx-lm suffixes and the metadata keys the sniffers read."""
    src = os.path.join("crates", "adapterkit-formats", "src")
    prefixes = rust_strings(os.path.join(src, "kohya.rs"), "pub const PREFIXES",
                            r'\("([^"]+)"')  # the first string of each tuple
    suffixes = rust_strings(os.path.join(src, "kohya.rs"), "const SUFFIXES")
    roles = rust_strings(os.path.join(src, "diffusers.rs"), "const ROLES")
    comps = rust_strings(os.path.join(src, "base_names.rs"), "pub const COMPONENTS")
    with open(os.path.join(OUT, "adapter_formats.dict"), "w") as f:
        f.write("# libFuzzer dictionary for adapter_formats: safetensors header words, kohya/LyCORIS "
                "prefixes and\n# suffixes, diffusers components and roles, mlx-lm suffixes. "
                "Regenerate with fuzz/dicts/make_dicts.py.\n")
        for line in open(os.path.join(OUT, "safetensors.dict")):
            if not line.startswith("#"):
                f.write(line)
        for p in prefixes:
            if p:
                f.write('"\\"%s"\n' % p)
        for x in dict.fromkeys(suffixes + roles + ["lora_a", "lora_b", "m"]):
            f.write('"%s\\""\n' % ("." + x))
        for c in comps:
            f.write('"\\"%s."\n' % c)
        for k in ["ss_network_module", "lycoris.kohya", "networks.lora", "lora_adapter_metadata",
                  "ss_sd_model_name", "ss_network_args", "lora_unet_double_blocks_0_img_attn_qkv",
                  "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                  "model.layers.0.self_attn.q_proj", "model.embed_tokens", "lm_head"]:
            f.write('"%s"\n' % k)
        f.write('"GGUF"\n')


if __name__ == "__main__":
    main()

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


if __name__ == "__main__":
    main()

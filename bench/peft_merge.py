#!/usr/bin/env python3
"""PEFT baseline for bench/merge_vs_cp.sh: merge a LoRA adapter the way most people do it.

Usage:
    python bench/peft_merge.py BASE_DIR ADAPTER_DIR OUT_DIR [--max-shard-size SIZE]

Loads the base model with transformers in bfloat16, applies the adapter with
PeftModel.from_pretrained, calls merge_and_unload() and save_pretrained() (safetensors).
Needs torch, transformers and peft; runs on CPU. Prints per-phase timings to stderr.
"""

import argparse
import sys
import time


def main():
    ap = argparse.ArgumentParser(description="PEFT merge_and_unload baseline")
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("out")
    ap.add_argument("--max-shard-size", default=None,
                    help="passed to save_pretrained (default: transformers' default)")
    args = ap.parse_args()

    t0 = time.monotonic()
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t_import = time.monotonic()

    # transformers >= 4.56 renamed torch_dtype= to dtype=; an older release would silently
    # store an unknown `dtype` kwarg in the config and load in float32, so pick by version.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        args.base, low_cpu_mem_usage=True, **{dtype_kw: torch.bfloat16})
    t_base = time.monotonic()

    model = PeftModel.from_pretrained(model, args.adapter)
    t_adapter = time.monotonic()

    model = model.merge_and_unload()
    t_merge = time.monotonic()

    kwargs = {"safe_serialization": True}
    if args.max_shard_size:
        kwargs["max_shard_size"] = args.max_shard_size
    model.save_pretrained(args.out, **kwargs)
    t_save = time.monotonic()

    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(
        f"peft_merge: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}, param dtypes {dtypes}\n"
        f"peft_merge: import {t_import - t0:.2f}s  load base {t_base - t_import:.2f}s  "
        f"load adapter {t_adapter - t_base:.2f}s  merge {t_merge - t_adapter:.2f}s  "
        f"save {t_save - t_merge:.2f}s  total {t_save - t0:.2f}s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

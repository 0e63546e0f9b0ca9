#!/usr/bin/env python3
"""Check a merged checkpoint against a numpy reference: W' = W + scale * (B @ A).

Usage:
    python3 bench/check_merge.py BASE_DIR ADAPTER_DIR MERGED_DIR

Needs only python3 + numpy (safetensors files are parsed by hand and memory-mapped, one tensor
at a time). For every base tensor with a LoRA pair in the adapter, the merged tensor must have
the base's dtype and shape and be within bf16 rounding of the float32 reference
(|out - ref| <= |ref| * 2^-7 + 2^-24 elementwise, i.e. about one bf16 ulp); every other tensor
must be bit-identical to the base. scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
Handles BF16 / F16 / F32 base tensors and the PEFT key layout
base_model.model.<base name without .weight>.lora_{A,B}.weight. Exits 1 on the first mismatch.
"""

import json
import os
import struct
import sys
import time

import numpy as np

NP_DTYPES = {"BF16": "<u2", "F16": "<f2", "F32": "<f4"}


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def index_dir(d):
    """name -> (path, data_start, info) for all tensors of a (sharded) checkpoint directory."""
    idx_path = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx_path):
        with open(idx_path, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    if not files:
        sys.exit(f"check_merge: no .safetensors in {d}")
    out = {}
    for fname in files:
        path = os.path.join(d, fname)
        start, header = read_header(path)
        for name, info in header.items():
            out[name] = (path, start, info)
    return out


def load(entry):
    """Tensor as float32 (converted from its on-disk dtype) plus its dtype string."""
    path, start, info = entry
    dtype = info["dtype"]
    if dtype not in NP_DTYPES:
        sys.exit(f"check_merge: unsupported dtype {dtype} in {path}")
    b, e = info["data_offsets"]
    raw = np.memmap(path, dtype=NP_DTYPES[dtype], mode="r", offset=start + b,
                    shape=((e - b) // np.dtype(NP_DTYPES[dtype]).itemsize,))
    if dtype == "BF16":
        x = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        x = raw.astype(np.float32)
    return x.reshape(info["shape"]), dtype


def to_dtype_rne(x, dtype):
    """Round float32 to the on-disk dtype (round-to-nearest-even) and back to float32."""
    if dtype == "BF16":
        u = x.view(np.uint32)
        u = (u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return u.view(np.float32)
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    return x


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().split("\n\n")[1])
    base_dir, adapter_dir, merged_dir = sys.argv[1:4]
    t0 = time.monotonic()
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / np.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        sys.exit("check_merge: rank_pattern / alpha_pattern are not supported by this checker")

    base = index_dir(base_dir)
    merged = index_dir(merged_dir)
    _s, aheader = read_header(os.path.join(adapter_dir, "adapter_model.safetensors"))
    apath = os.path.join(adapter_dir, "adapter_model.safetensors")
    adapter = {n: (apath, _s, info) for n, info in aheader.items()}

    fail = []
    if set(base) != set(merged):
        fail.append(f"tensor names differ: missing {sorted(set(base) - set(merged))[:5]}, "
                    f"extra {sorted(set(merged) - set(base))[:5]}")
    n_merged = n_same = 0
    worst = 0.0
    exact = total = 0
    for name in sorted(base):
        if name not in merged:
            continue
        w, wdt = load(base[name])
        o, odt = load(merged[name])
        if odt != wdt or o.shape != w.shape:
            fail.append(f"{name}: merged {odt}{list(o.shape)} != base {wdt}{list(w.shape)}")
            continue
        stem = "base_model.model." + (name[: -len(".weight")] if name.endswith(".weight") else name)
        ka, kb = stem + ".lora_A.weight", stem + ".lora_B.weight"
        if ka in adapter and kb in adapter:
            a, _ = load(adapter[ka])
            b, _ = load(adapter[kb])
            ref = w + np.float32(scale) * (b @ a)
            err = np.abs(o - ref)
            tol = np.abs(ref) * np.float32(2.0 ** -7) + np.float32(2.0 ** -24)
            bad = err > tol
            if bad.any():
                i = int(np.argmax(err - tol))
                fail.append(f"{name}: {int(bad.sum())} elements off; worst at flat index {i}: "
                            f"merged {o.flat[i]!r} reference {ref.flat[i]!r} base {w.flat[i]!r}")
            if (o != w).mean() < 0.5:
                fail.append(f"{name}: fewer than half of the elements changed; was the delta applied?")
            # relative to the larger of |ref| and |W|: where W + delta cancels, |ref| is tiny and a
            # different summation order legitimately gives a large error relative to |ref|
            worst = max(worst, float((err / np.maximum(np.maximum(np.abs(ref), np.abs(w)), 1e-30)).max()))
            exact += int((o == to_dtype_rne(ref.astype(np.float32), wdt)).sum())
            total += o.size
            n_merged += 1
        else:
            if not np.array_equal(o.view(np.uint32), w.view(np.uint32)):
                fail.append(f"{name}: not a LoRA target but differs from the base")
            n_same += 1
        if len(fail) >= 5:
            break
    if fail:
        print("check_merge: FAILED", file=sys.stderr)
        for line in fail:
            print("  " + line, file=sys.stderr)
        sys.exit(1)
    if n_merged == 0:
        sys.exit("check_merge: FAILED: no base tensor matched a LoRA pair in the adapter")
    print(f"check_merge: OK: {n_merged} merged tensors within bf16 rounding of W + {scale:g}*B@A "
          f"(max err {worst:.2e} relative to max(|ref|, |W|); {total - exact} of {total} elements "
          f"differ from round-to-nearest-even of the f32 reference), {n_same} other tensors bit-identical ({time.monotonic() - t0:.1f}s)")


if __name__ == "__main__":
    main()

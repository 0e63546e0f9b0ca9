#!/usr/bin/env python3
"""Check an extracted LoRA adapter against the true delta FINETUNED - BASE.

Usage:
    python3 bench/check_extract.py ADAPTER_DIR BASE_DIR FINETUNED_DIR
                                   [--sample N] [--modules NAME ...] [--max-excess E] [--no-optimal]

Needs only python3 + numpy (safetensors files are parsed by hand and memory-mapped). For a sample
of LoRA target modules (default 7: one of each of q/k/v/o/gate/up/down_proj, spread over the
layers), it computes in float64

    err = ||dW - s * B @ A||_F / ||dW||_F,   dW = W_finetuned - W_base,

with B = base_model.model.<module>.lora_B.weight (out, r), A = ...lora_A.weight (r, in) and
s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), r and lora_alpha taken from
adapter_config.json's rank_pattern / alpha_pattern when a key matches the module the way PEFT's
get_pattern_key matches it, and from r / lora_alpha otherwise.

It compares err with the best any rank-r adapter can do (Eckart-Young):
opt = sqrt(sum_{i>r} s_i^2) / sqrt(sum s_i^2), with s_i the singular values of dW in float32
(np.linalg.svd(..., compute_uv=False); a few seconds per module on 2 cores; --no-optimal skips
it). A module fails when err > opt + max-excess (default 0.01, i.e. one percentage point).

It also reports:
- the adapter's other (full-rank, modules_to_save) tensors, and whether each equals the fine-tuned
  tensor of the same name after conversion to float32;
- the tensors that differ between BASE and FINETUNED but that the adapter covers neither with a
  LoRA pair nor with a full-rank copy (e.g. RMSNorm weights an extractor leaves out). This is
  informational: it does not fail the check.

Exits 1 when a sampled module is missing from the adapter or fails, 0 otherwise.
"""

import argparse
import json
import math
import os
import re
import struct
import sys
import time

import numpy as np

NP_DTYPES = {"BF16": "<u2", "F16": "<f2", "F32": "<f4", "F64": "<f8"}
PROJ_RE = re.compile(r"^(model\.layers\.(\d+)\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj))\.weight$")
PROJ_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


def fail(msg):
    sys.exit(f"check_extract: {msg}")


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def index_files(d, files):
    out = {}
    for fname in files:
        path = os.path.join(d, fname)
        start, header = read_header(path)
        for name, info in header.items():
            out[name] = (path, start, info)
    return out


def index_checkpoint(d):
    """name -> (path, data_start, info) for all tensors of a (sharded) checkpoint directory."""
    idx_path = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx_path):
        with open(idx_path, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    if not files:
        fail(f"no .safetensors in {d}")
    return index_files(d, files)


def raw_bytes(entry):
    path, start, info = entry
    b, e = info["data_offsets"]
    return np.memmap(path, dtype=np.uint8, mode="r", offset=start + b, shape=(e - b,)) if e > b \
        else np.zeros(0, np.uint8)


def load(entry, dtype=np.float64):
    """Tensor converted from its on-disk dtype to `dtype` (exactly, for BF16/F16/F32 -> f32/f64)."""
    path, start, info = entry
    st = info["dtype"]
    if st not in NP_DTYPES:
        fail(f"unsupported dtype {st} in {path}")
    raw = raw_bytes(entry).view(NP_DTYPES[st])
    if st == "BF16":
        x = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        x = raw
    return x.astype(dtype).reshape(info["shape"])


def pattern_value(patterns, module, default):
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def sample_modules(projections, n):
    """n modules cycling through q/k/v/o/gate/up/down, at layers spread from the first to the last."""
    layers = sorted({int(m.group(2)) for m in (PROJ_RE.match(p + ".weight") for p in projections)})
    by_key = set(projections)
    picks = []
    for i in range(n):
        layer = layers[round(i * (len(layers) - 1) / max(1, n - 1))]
        kind = PROJ_ORDER[i % len(PROJ_ORDER)]
        parent = "self_attn" if kind in PROJ_ORDER[:4] else "mlp"
        name = f"model.layers.{layer}.{parent}.{kind}"
        if name in by_key and name not in picks:
            picks.append(name)
    return picks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter", help="extracted PEFT LoRA adapter directory")
    ap.add_argument("base", help="base checkpoint directory")
    ap.add_argument("finetuned", help="fine-tuned checkpoint directory")
    ap.add_argument("--sample", type=int, default=7, help="modules to check (default 7)")
    ap.add_argument("--modules", nargs="+", help="check these modules (e.g. model.layers.0.mlp.up_proj)")
    ap.add_argument("--max-excess", type=float, default=0.01,
                    help="fail when err exceeds the optimal rank-r error by more than this (0.01)")
    ap.add_argument("--no-optimal", action="store_true", help="skip the SVD of each sampled delta")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    with open(os.path.join(args.adapter, "adapter_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        fail(f"peft_type is {cfg.get('peft_type')}, not LORA")
    if cfg.get("fan_in_fan_out"):
        fail("fan_in_fan_out adapters are not supported")
    if cfg.get("use_dora"):
        fail("DoRA adapters are not supported")
    r0, alpha0 = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    rslora = bool(cfg.get("use_rslora"))
    afiles = sorted(f for f in os.listdir(args.adapter) if f.endswith(".safetensors"))
    if not afiles:
        fail(f"no .safetensors in {args.adapter}")
    adapter = index_files(args.adapter, afiles)
    base = index_checkpoint(args.base)
    ft = index_checkpoint(args.finetuned)

    projections = sorted(m.group(1) for m in (PROJ_RE.match(k) for k in base) if m)
    lora_modules = sorted(k[len(PREFIX):-len(".lora_A.weight")] for k in adapter
                          if k.startswith(PREFIX) and k.endswith(".lora_A.weight"))
    full_rank = sorted(k for k in adapter if ".lora_" not in k)
    factor_dtypes = sorted({adapter[k][2]["dtype"] for k in adapter if ".lora_" in k})
    adapter_bytes = sum(os.path.getsize(os.path.join(args.adapter, f)) for f in afiles)
    print(f"adapter: {args.adapter}: {len(lora_modules)} LoRA modules (of {len(projections)} projections), "
          f"{len(full_rank)} full-rank tensors, factors {'/'.join(factor_dtypes) or '-'}, "
          f"{adapter_bytes / 2**20:.1f} MiB; r {r0}, lora_alpha {alpha0}, rslora {rslora}, "
          f"rank_pattern {len(cfg.get('rank_pattern') or {})} keys, alpha_pattern "
          f"{len(cfg.get('alpha_pattern') or {})} keys")

    # --- sampled LoRA modules ---
    modules = args.modules or sample_modules(projections, args.sample)
    if not modules:
        fail("no modules to check")
    print(f"{'module':40} {'shape':>11} {'r':>3} {'scale':>7} {'|dW|/|W|':>9} {'err':>8} "
          f"{'opt_r':>8} {'excess':>9} {'s':>5}")
    bad = []
    results = []
    for mod in modules:
        ka, kb = f"{PREFIX}{mod}.lora_A.weight", f"{PREFIX}{mod}.lora_B.weight"
        if mod + ".weight" not in base or mod + ".weight" not in ft:
            fail(f"{mod}.weight is not in both BASE and FINETUNED")
        if ka not in adapter or kb not in adapter:
            print(f"{mod:40} MISSING from the adapter")
            bad.append(f"{mod} missing")
            continue
        ts = time.monotonic()
        w = load(base[mod + ".weight"])
        dw = load(ft[mod + ".weight"]) - w
        a, b = load(adapter[ka]), load(adapter[kb])
        r = pattern_value(cfg.get("rank_pattern"), mod, r0)
        alpha = pattern_value(cfg.get("alpha_pattern"), mod, alpha0)
        if a.shape[0] != r or b.shape[1] != r or b.shape[0] != dw.shape[0] or a.shape[1] != dw.shape[1]:
            print(f"{mod:40} shape mismatch: A {list(a.shape)}, B {list(b.shape)}, dW {list(dw.shape)}, r {r}")
            bad.append(f"{mod} shapes")
            continue
        scale = alpha / (math.sqrt(r) if rslora else r)
        dw_norm = np.linalg.norm(dw)
        err = float(np.linalg.norm(dw - scale * (b @ a)) / dw_norm) if dw_norm > 0 else float("nan")
        if args.no_optimal:
            opt = float("nan")
        else:
            s = np.linalg.svd(dw.astype(np.float32), compute_uv=False).astype(np.float64)
            opt = float(math.sqrt(float(np.sum(s[r:] ** 2)) / float(np.sum(s ** 2))))
        excess = err - opt
        rel = float(dw_norm / np.linalg.norm(w))
        ok = math.isfinite(err) and (args.no_optimal or excess <= args.max_excess)
        if not ok:
            bad.append(f"{mod} err {err:.4f} vs optimal {opt:.4f}")
        results.append((err, opt))
        print(f"{mod:40} {'x'.join(map(str, dw.shape)):>11} {r:>3} {scale:>7.3g} {rel:>9.4f} {err:>8.4f} "
              f"{opt:>8.4f} {excess:>+9.1e} {time.monotonic() - ts:>5.1f}{'' if ok else '  FAIL'}")
        del w, dw, a, b

    # --- full-rank tensors (modules_to_save) ---
    fr_same, fr_diff, fr_unknown = [], [], []
    for k in full_rank:
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k[len(PREFIX):] if k.startswith(PREFIX) else k)
        if name not in ft:
            fr_unknown.append(k)
        elif adapter[k][2]["shape"] == ft[name][2]["shape"] and \
                np.array_equal(load(adapter[k], np.float32), load(ft[name], np.float32)):
            fr_same.append(name)
        else:
            fr_diff.append(name)
    if full_rank:
        print(f"full-rank tensors: {len(fr_same)} equal to FINETUNED, {len(fr_diff)} differ"
              + (f" ({', '.join(fr_diff[:3])}{', ...' if len(fr_diff) > 3 else ''})" if fr_diff else "")
              + (f", {len(fr_unknown)} not in FINETUNED ({', '.join(fr_unknown[:3])})" if fr_unknown else ""))

    # --- changed tensors the adapter does not cover ---
    covered = {m + ".weight" for m in lora_modules} | set(fr_same) | set(fr_diff)
    uncovered = []
    for name in sorted(ft):
        if name in covered or name not in base:
            continue
        eb, ef = base[name], ft[name]
        if eb[2]["dtype"] != ef[2]["dtype"] or eb[2]["shape"] != ef[2]["shape"] \
                or not np.array_equal(raw_bytes(eb), raw_bytes(ef)):
            uncovered.append(name)
    if uncovered:
        print(f"not covered: {len(uncovered)} tensors differ between BASE and FINETUNED but are in the "
              f"adapter neither as LoRA nor at full rank (e.g. {', '.join(uncovered[:3])})")

    elapsed = time.monotonic() - t0
    if results:
        errs = [e for e, _ in results]
        opts = [o for _, o in results]
        summary = (f"{len(results)} modules: err {min(errs):.4f}..{max(errs):.4f}, "
                   f"optimal rank-r {min(opts):.4f}..{max(opts):.4f}")
    else:
        summary = "no module checked"
    if bad:
        print(f"check_extract: FAIL: {summary}; {len(bad)} bad: {'; '.join(bad)} ({elapsed:.1f}s)")
        sys.exit(1)
    print(f"check_extract: OK: {summary}; {len(uncovered)} changed tensors not covered ({elapsed:.1f}s)")


if __name__ == "__main__":
    main()

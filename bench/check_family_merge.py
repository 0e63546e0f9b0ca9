#!/usr/bin/env python3
"""Check a merged checkpoint against a numpy reference merge of one PEFT-family adapter.

Usage:
    python3 bench/check_family_merge.py BASE_DIR ADAPTER_DIR MERGED_DIR [--layers N]

For the adapters written by bench/gen_family_adapters.py (and gen_tinyllama.py's LoRA): LORA
(plain and DoRA), IA3, LOHA, LOKR, OFT (Cayley-Neumann or exact, no COFT / block_share), BOFT,
HRA, VERA and FOURIERFT, Linear layers only, no rank/alpha patterns. The formulas are those of
fixtures/peft_families/README.md (PEFT 0.21.2), computed here in float64 with numpy.
FourierFT's indices use fixtures/peft_families/randperm_reference.py (torch CPU randperm).

Every targeted tensor must have the base's dtype and shape and be within about one BF16 ulp of
the reference (|out - ref| <= |ref|*2^-7 + 2^-20), and must differ from the base somewhere;
every other tensor must be bit-identical to the base. With --layers N only the first N layers'
targets are compared (the reference for OFT/BOFT/HRA/FourierFT costs seconds per layer).
Needs python3 + numpy only. Exits 1 on mismatch.
"""

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_merge import index_dir, load, read_header, to_dtype_rne  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "fixtures", "peft_families"))

PREFIX = "base_model.model."

# Parameter suffix that marks a module as targeted, per peft_type.
MARKERS = {
    "LORA": "lora_A.weight", "IA3": "ia3_l", "LOHA": "hada_w1_a", "LOKR": "lokr_w1", "OFT": "oft_R.weight",
    "BOFT": "boft_R", "HRA": "hra_u", "VERA": "vera_lambda_b", "FOURIERFT": "fourierft_spectrum",
}


def skew(vec, bs):
    nb = vec.shape[0]
    rows, cols = np.triu_indices(bs, 1)  # row-major upper triangle, as torch.triu_indices
    q = np.zeros((nb, bs, bs))
    q[:, rows, cols] = vec
    return q - q.transpose(0, 2, 1)


def apply_blocks(w, blocks):
    """W @ M^T for M = block_diag(blocks): out[o, b, i] = sum_j W[o, b, j] * blocks[b, i, j]."""
    out_f, in_f = w.shape
    nb, bs, _ = blocks.shape
    if nb == 1 and in_f != bs:
        blocks = np.broadcast_to(blocks, (in_f // bs, bs, bs))
        nb = in_f // bs
    return np.einsum("obj,bij->obi", w.reshape(out_f, nb, bs), blocks).reshape(out_f, in_f)


def reference(peft_type, cfg, get, w, out_f, in_f, shared):
    """float64 reference of the merged weight of one Linear module."""
    if peft_type == "LORA":
        a, b = get("lora_A.weight"), get("lora_B.weight")
        scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
        merged = w + scale * (b @ a)
        if cfg.get("use_dora"):
            mag = get("lora_magnitude_vector")
            merged = (mag / np.linalg.norm(merged, axis=1))[:, None] * merged
        return merged
    if peft_type == "IA3":
        return w * get("ia3_l")  # [out,1] scales rows, [1,in] (feedforward) scales columns
    if peft_type == "LOHA":
        scale = cfg["alpha"] / cfg["r"]
        return w + (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b")) * scale
    if peft_type == "LOKR":
        w1 = get("lokr_w1")
        w2 = get("lokr_w2")
        if w2 is None:
            w2 = get("lokr_w2_a") @ get("lokr_w2_b")
        return w + np.kron(w1, w2) * (cfg["alpha"] / cfg["r"])
    if peft_type == "OFT":
        if cfg.get("coft") or cfg.get("block_share"):
            sys.exit("check_family_merge: OFT coft / block_share are not supported by this checker")
        vec = get("oft_R.weight")
        bs = int(round((1 + math.sqrt(1 + 8 * vec.shape[1])) / 2))
        q = skew(vec, bs)
        eye = np.broadcast_to(np.eye(bs), q.shape)
        if cfg.get("use_cayley_neumann", True):
            terms = cfg.get("num_cayley_neumann_terms", 5)
            r = eye.copy()
            if terms > 1:
                r = r + 2.0 * q
                if terms > 2:
                    qp = q @ q
                    r = r + 2.0 * qp
                    for _ in range(3, terms - 1):
                        qp = qp @ q
                        r = r + 2.0 * qp
                    qp = qp @ q
                    r = r + qp
        else:
            r = (eye - q) @ np.linalg.inv(eye + q)
        return apply_blocks(w, r)
    if peft_type == "BOFT":
        rp, s = get("boft_R"), get("boft_s")
        if rp.shape[0] != 1:
            sys.exit("check_family_merge: BOFT with more than one butterfly factor is not supported by this checker")
        data = rp[0]
        sk = 0.5 * (data - data.transpose(0, 2, 1))
        eye = np.broadcast_to(np.eye(data.shape[1]), sk.shape)
        q = (eye - sk) @ np.linalg.inv(eye + sk)
        return apply_blocks(w, q) * s
    if peft_type == "HRA":
        if cfg.get("apply_GS"):
            sys.exit("check_family_merge: HRA apply_GS is not supported by this checker")
        u = get("hra_u")
        u = u / np.linalg.norm(u, axis=0)
        out = w
        for i in range(u.shape[1]):  # W @ (I - 2 u0 u0^T)(I - 2 u1 u1^T)...
            ui = u[:, i]
            out = out - 2.0 * np.outer(out @ ui, ui)
        return out
    if peft_type == "VERA":
        a, b = shared["base_model.vera_A"], shared["base_model.vera_B"]
        lb, ld = get("vera_lambda_b"), get("vera_lambda_d")
        return w + (lb[:, None] * b[:out_f, :]) @ (ld[:, None] * a[:, :in_f])
    if peft_type == "FOURIERFT":
        from randperm_reference import torch_randperm_prefix

        spec = get("fourierft_spectrum")
        idx = np.array(torch_randperm_prefix(out_f * in_f, cfg["random_loc_seed"], spec.size), dtype=np.int64)
        dense = np.zeros((out_f, in_f))
        dense[idx // in_f, idx % in_f] = spec
        return w + np.fft.ifft2(dense).real * cfg["scaling"]
    sys.exit(f"check_family_merge: peft_type {peft_type} is not supported by this checker")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("merged_dir")
    ap.add_argument("--layers", type=int, default=None, help="compare the targets of the first N layers only")
    args = ap.parse_args()
    t0 = time.monotonic()
    with open(os.path.join(args.adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    peft_type = cfg["peft_type"]
    if peft_type not in MARKERS:
        sys.exit(f"check_family_merge: peft_type {peft_type} is not supported by this checker")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("n_frequency_pattern"):
        sys.exit("check_family_merge: rank/alpha/n_frequency patterns are not supported by this checker")
    if cfg.get("fan_in_fan_out"):
        sys.exit("check_family_merge: fan_in_fan_out is not supported by this checker")

    base = index_dir(args.base_dir)
    merged = index_dir(args.merged_dir)
    apath = os.path.join(args.adapter_dir, "adapter_model.safetensors")
    astart, aheader = read_header(apath)
    adapter = {n: (apath, astart, info) for n, info in aheader.items()}
    shared = {n: load(e)[0].astype(np.float64) for n, e in adapter.items() if not n.startswith(PREFIX)}
    marker = MARKERS[peft_type]
    targets = {n[len(PREFIX): -len(marker) - 1] + ".weight" for n in adapter
               if n.startswith(PREFIX) and n.endswith("." + marker)}
    if not targets:
        sys.exit(f"check_family_merge: FAILED: no '{marker}' tensors in {apath}")

    fail = []
    if set(base) != set(merged):
        fail.append(f"tensor names differ: missing {sorted(set(base) - set(merged))[:5]}, "
                    f"extra {sorted(set(merged) - set(base))[:5]}")
    missing = sorted(targets - set(base))
    if missing:
        fail.append(f"adapter targets not in the base: {missing[:5]}")
    n_checked = n_skipped = n_same = 0
    worst_ulps = 0.0
    exact = total = 0
    delta_rms = []
    for name in sorted(base):
        if name not in merged or fail and len(fail) >= 5:
            continue
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if name in targets and args.layers is not None and m and int(m.group(1)) >= args.layers:
            n_skipped += 1
            continue
        w, wdt = load(base[name])
        o, odt = load(merged[name])
        if odt != wdt or o.shape != w.shape:
            fail.append(f"{name}: merged {odt}{list(o.shape)} != base {wdt}{list(w.shape)}")
            continue
        if name not in targets:
            if not np.array_equal(o.view(np.uint32), w.view(np.uint32)):
                fail.append(f"{name}: not targeted by the adapter but differs from the base")
            n_same += 1
            continue
        stem = PREFIX + name[: -len(".weight")] + "."

        def get(param, stem=stem):
            e = adapter.get(stem + param)
            return None if e is None else load(e)[0].astype(np.float64)

        out_f, in_f = w.shape
        ref = reference(peft_type, cfg, get, w.astype(np.float64), out_f, in_f, shared)
        if not np.isfinite(o).all():
            fail.append(f"{name}: merged tensor has non-finite values")
            continue
        err = np.abs(o - ref)
        tol = np.abs(ref) * 2.0 ** -7 + 2.0 ** -20
        bad = err > tol
        if bad.any():
            i = int(np.argmax(err - tol))
            fail.append(f"{name}: {int(bad.sum())} of {o.size} elements off; worst at flat index {i}: "
                        f"merged {o.flat[i]!r} reference {ref.flat[i]!r} base {w.flat[i]!r}")
        if np.array_equal(o, w):
            fail.append(f"{name}: identical to the base; was the adapter applied?")
        # bf16 ulp (8 significant bits) of max(|ref|, |W|): where the update cancels W, |ref| is
        # tiny and a different summation order legitimately gives a large error relative to |ref|
        ulp = np.maximum(np.maximum(np.abs(ref), np.abs(w)), 2.0 ** -126) * 2.0 ** -8
        worst_ulps = max(worst_ulps, float((err / ulp).max()))
        exact += int((o == to_dtype_rne(ref.astype(np.float32), wdt)).sum())
        total += o.size
        delta_rms.append(float(np.sqrt(np.mean((ref - w) ** 2))))
        n_checked += 1
    if fail:
        print(f"check_family_merge ({peft_type}): FAILED", file=sys.stderr)
        for line in fail:
            print("  " + line, file=sys.stderr)
        sys.exit(1)
    dora = " (DoRA)" if cfg.get("use_dora") else ""
    print(f"check_family_merge ({peft_type}{dora}): OK: {n_checked} merged tensors within one bf16 ulp of the "
          f"float64 reference (max {worst_ulps:.2f} ulp of max(|ref|, |W|); {total - exact} of {total} elements differ from "
          f"round-to-nearest-even of the reference); reference delta rms {min(delta_rms):.2e}..{max(delta_rms):.2e}; "
          f"{n_same} other tensors bit-identical"
          + (f"; {n_skipped} targets of later layers not compared" if n_skipped else "")
          + f" ({time.monotonic() - t0:.1f}s)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Compare TIES merges of the same checkpoints, with each other and with a reference.

Usage:
    python3 bench/check_ties.py LABEL=DIR [LABEL=DIR ...]
                                [--base BASE --models FT1 FT2 ... --weights W1,W2,... --density D]
                                [--ref-layers all|none|0,11,21] [--max-wrong N] [--json FILE] [-v]

Needs only python3 + numpy (safetensors files are parsed by hand and memory-mapped, one tensor at a
time). Each DIR is a merged checkpoint: a directory with model.safetensors.index.json, or with one
or more *.safetensors files (mergekit writes a single model.safetensors), or a .safetensors file.

1. Pairwise, for every pair of outputs and every tensor (names, shapes and dtypes must match):
   how many elements differ at all, how many differ by more than one BF16 ulp (ulp distance = the
   difference of the BF16 bit patterns read as sign-magnitude integers, so 1 means "neighbouring
   BF16 values"), the largest ulp distance, the largest absolute difference, and that difference
   relative to the tensor's scale (rms of the second output's tensor) and, with --base, to the
   scale of the merged update (rms of OUT - BASE).

2. With --base and --models, a float32 reference of mergekit's TIES (mergekit 0.1.5,
   merge_methods/generalized_task_arithmetic.py with sparsify.magnitude; ties = magnitude
   sparsification + sum sign consensus + normalize, no rescale, lambda 1):

       d_i   = FT_i - BASE                                   (exact in float32*)
       k     = max(1, int(density * numel))                  (per tensor and model)
       keep  = the k entries of largest |d_i|                (ties at the threshold: all kept)
       wd_i  = w_i * d_i * keep_i
       sign  = +1 where sum_i wd_i >= 0, else -1             (weighted sum, as mergekit does)
       agree = sign(wd_i) == sign                            (a zero wd_i never agrees)
       out   = BASE + sum_i wd_i*agree_i / sum_i w_i*agree_i (divisor 0 -> 1)

   * float32 is exact for differences of BF16 values whose exponents are at most 15 apart; its
   other roundings (2^-24 relative) are far below every tolerance below.
   Every element of every output is put in one class, first match wins:
     exact    equal to round-to-nearest-even BF16 of the reference
     1ulp     one BF16 ulp from it
     arith    |out - ref| <= ulp(ref) + 2^-6 * |merged update|: the rounding of BF16 intermediate
              arithmetic (mergekit with dtype bfloat16 computes the deltas, the weighted deltas,
              the sums and the division in BF16)
     trim     |d_i| of some model with d_i != 0 lies within 2^-7 (relative) of that model's
              top-k threshold: rounding the delta to BF16 reorders such entries, and argsort
              breaks ties arbitrarily, so which of them are kept is not determined
     sign     |sum_i wd_i| <= 2^-6 * sum_i |wd_i|: the elected sign is within rounding of a tie
     wrong    none of the above
   An output with a "wrong" element fails. The first few wrong elements are printed with their
   inputs. --ref-layers restricts the reference to some decoder layers (the other tensors are
   compared pairwise only); tensors that no model changes are checked cheaply (ref = base).

Exit status: 0 when every output has at most --max-wrong (default 0) wrong elements and has the
expected tensors, 1 otherwise, 2 on usage or I/O errors. A pairwise difference by itself does not
fail: with the reference the classes above say whose it is; without the reference pairwise
differences beyond one ulp are reported as such.
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
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
CLASSES = ["exact", "1ulp", "arith", "trim", "sign", "wrong"]
TRIM_BAND = 2.0 ** -7
SIGN_BAND = 2.0 ** -6
ARITH_REL = 2.0 ** -6


def die(msg, code=2):
    print(f"check_ties: {msg}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------
# safetensors, by hand
# ---------------------------------------------------------------------------------------------
def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def index_checkpoint(d):
    """name -> (path, data_start, info) of a checkpoint directory or a single .safetensors file."""
    if os.path.isfile(d):
        files = [d]
    else:
        idx_path = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(idx_path):
            with open(idx_path, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        else:
            names = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
        if not names:
            die(f"{d}: no .safetensors files")
        files = [os.path.join(d, n) for n in names]
    out = {}
    for path in files:
        start, header = read_header(path)
        for name, info in header.items():
            if name in out:
                die(f"{d}: tensor {name} appears in two files")
            out[name] = (path, start, info)
    return out


def load_raw(entry):
    """The tensor as stored: uint16 bit patterns for BF16, a float array otherwise (memory-mapped)."""
    path, start, info = entry
    dt = info["dtype"]
    if dt not in NP_DTYPES:
        die(f"{path}: unsupported dtype {dt}")
    shape = tuple(info["shape"])
    a, b = info["data_offsets"]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    arr = np.memmap(path, dtype=NP_DTYPES[dt], mode="r", offset=start + a, shape=(n,)) if n else \
        np.zeros(0, dtype=NP_DTYPES[dt])
    if arr.nbytes != b - a:
        die(f"{path}: data_offsets of a tensor do not match its shape and dtype")
    return dt, arr


def to_f32(dt, raw):
    if dt == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def bf16_bits(x):
    """float32 -> BF16 bit patterns, round-to-nearest-even (finite values)."""
    bits = x.astype(np.float32, copy=False).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


_ALL16 = np.arange(65536, dtype=np.int32)
_ORDERED = np.where(_ALL16 & 0x8000, -(_ALL16 & 0x7FFF), _ALL16).astype(np.int32)


def ordered(bits16):
    """BF16 bit patterns -> integers whose differences count ulps (sign-magnitude to linear)."""
    return _ORDERED[bits16]


def ulp_bf16(x):
    """One BF16 ulp at |x| (the spacing of the binade of |x|; subnormal spacing below 2^-126)."""
    _, e = np.frexp(np.maximum(np.abs(x), np.float32(2.0 ** -126)))
    return np.ldexp(np.float32(1.0), e - 8)


def ulp_distance(dt_a, raw_a, dt_b, raw_b, va, vb, ord_a=None, ord_b=None):
    if dt_a == "BF16" and dt_b == "BF16":
        return np.abs((ordered(raw_a) if ord_a is None else ord_a) - (ordered(raw_b) if ord_b is None else ord_b))
    # Mixed dtypes: the difference in BF16 ulps of the larger magnitude (rounded up).
    return np.ceil(np.abs(va - vb) / ulp_bf16(np.maximum(np.abs(va), np.abs(vb)))).astype(np.int64)


def rms(x):
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    return math.sqrt(float(np.dot(x, x)) / x.size) if x.size else 0.0


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------
def ties_reference(w, fts, weights, density):
    """Reference of mergekit's TIES for one flat tensor, in float32.

    float32 is exact for the deltas of BF16 values (unless their exponents are more than 15
    apart) and its other roundings (2^-24 relative) are far below every tolerance used here.
    Returns (ref, mixed, trim_band, sign_band): ref = w + mixed, the element masks of the two
    ambiguity bands (see the module docstring)."""
    n = w.size
    k = n if density >= 1 else (0 if density <= 0 or n == 0 else max(1, int(density * n)))
    num = np.zeros(n, dtype=np.float32)
    s = np.zeros(n, dtype=np.float32)
    sabs = np.zeros(n, dtype=np.float32)
    trim_band = np.zeros(n, dtype=bool)
    wds = []
    for ft, wt in zip(fts, weights):
        d = ft - w
        if k < n:
            a = np.abs(d)
            t = np.partition(a, n - k)[n - k] if k > 0 else np.float32(np.inf)
            keep = a >= t
            trim_band |= (np.abs(a - t) <= np.float32(TRIM_BAND) * t) & (d != 0)
            d *= keep
            del a, keep
        d *= np.float32(wt)
        s += d
        sabs += np.abs(d)
        wds.append(d)
    maj = np.where(s >= 0, np.float32(1), np.float32(-1))
    den = np.zeros(n, dtype=np.float32)
    for wd, wt in zip(wds, weights):
        agree = np.sign(wd) == maj
        num += np.where(agree, wd, np.float32(0))
        den += np.where(agree, np.float32(wt), np.float32(0))
    del wds
    den[den == 0] = 1
    mixed = num / den
    sign_band = (np.abs(s) <= np.float32(SIGN_BAND) * sabs) & (sabs > 0)
    return w + mixed, mixed, trim_band, sign_band


def classify(dt, raw, v, ref, ref_bits, mixed, trim_band, sign_band, ord_v=None, ord_ref=None):
    """Class index (see CLASSES) per element of one output against the reference."""
    if dt == "BF16" and np.array_equal(raw, ref_bits):
        return np.zeros(v.shape, dtype=np.int8)
    if dt == "BF16":
        du = np.abs((ordered(raw) if ord_v is None else ord_v) - (ordered(ref_bits) if ord_ref is None else ord_ref))
    else:
        du = np.ceil(np.abs(v - ref) / ulp_bf16(ref)).astype(np.int64)
    cls = np.full(v.shape, 5, dtype=np.int8)
    cls[du == 0] = 0
    cls[du == 1] = 1
    rest = du > 1
    if rest.any():
        arith = rest & (np.abs(v - ref) <= ulp_bf16(ref) + np.float32(ARITH_REL) * np.abs(mixed))
        cls[arith] = 2
        rest &= ~arith
        t = rest & trim_band
        cls[t] = 3
        rest &= ~t
        sg = rest & sign_band
        cls[sg] = 4
    return cls


# ---------------------------------------------------------------------------------------------
def parse_outputs(specs):
    outs = []
    for s in specs:
        label, sep, d = s.partition("=")
        if not sep:
            label, d = os.path.basename(os.path.normpath(s)), s
        if not os.path.exists(d):
            die(f"{d}: no such file or directory")
        outs.append((label, d))
    if len({l for l, _ in outs}) != len(outs):
        die("output labels must differ")
    return outs


def fmt_count(n, total):
    return f"{n} ({100.0 * n / total:.4f}%)" if total else str(n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", metavar="LABEL=DIR", help="merged checkpoints to compare")
    ap.add_argument("--base", help="the base checkpoint (enables the reference and delta-relative sizes)")
    ap.add_argument("--models", nargs="+", default=[], help="the fine-tuned checkpoints, in merge order")
    ap.add_argument("--weights", help="comma-separated weight per model (default 1 each)")
    ap.add_argument("--density", type=float, default=0.5, help="TIES density (default 0.5)")
    ap.add_argument("--ref-layers", default="all",
                    help="decoder layers the reference covers: all (default), none, or e.g. 0,11,21; "
                         "tensors outside decoder layers are always covered")
    ap.add_argument("--max-wrong", type=int, default=0, help="wrong elements allowed per output (default 0)")
    ap.add_argument("--examples", type=int, default=5, help="wrong elements printed per output (default 5)")
    ap.add_argument("--json", help="also write the per-tensor results as JSON to this file")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per tensor")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    outs = parse_outputs(args.outputs)
    with_ref = bool(args.base and args.models)
    if args.models and not args.base:
        die("--models needs --base")
    weights = [1.0] * len(args.models)
    if args.weights:
        weights = [float(x) for x in args.weights.split(",")]
        if len(weights) != len(args.models):
            die(f"--weights has {len(weights)} value(s) but {len(args.models)} model(s) were given")
    if args.ref_layers == "all":
        ref_layers = None
    elif args.ref_layers == "none":
        ref_layers = set()
    else:
        ref_layers = {int(x) for x in args.ref_layers.split(",")}

    idx = {label: index_checkpoint(d) for label, d in outs}
    base_idx = index_checkpoint(args.base) if args.base else None
    model_idx = [index_checkpoint(m) for m in args.models]

    problems = {label: [] for label, _ in outs}
    # Expected tensor names: the base's when given, else the first output's.
    names = list(base_idx) if base_idx else list(idx[outs[0][0]])
    for label, _ in outs:
        missing = [n for n in names if n not in idx[label]]
        extra = [n for n in idx[label] if n not in set(names)]
        if missing:
            problems[label].append(f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
        if extra:
            problems[label].append(f"{len(extra)} unexpected tensor(s), e.g. {extra[:3]}")
    for m, mi in zip(args.models, model_idx):
        gone = [n for n in names if n not in mi]
        if gone:
            die(f"{m} lacks {len(gone)} tensor(s) of the base, e.g. {gone[:3]}")

    pairs = [(i, j) for i in range(len(outs)) for j in range(i + 1, len(outs))]
    pair_tot = {p: dict(n=0, diff=0, over1=0, over1_explained=0, max_ulp=0, max_abs=0.0,
                        max_rel=0.0, max_rel_delta=0.0, worst=None, tensors_differ=0) for p in pairs}
    cls_tot = {label: np.zeros(len(CLASSES), dtype=np.int64) for label, _ in outs}
    ref_elems = 0
    ref_tensors = 0
    examples = {label: [] for label, _ in outs}
    per_tensor = []

    for name in names:
        entries = {label: idx[label].get(name) for label, _ in outs}
        present = [label for label, _ in outs if entries[label] is not None]
        if not present:
            continue
        shape = None
        loaded = {}
        for label in present:
            dt, raw = load_raw(entries[label])
            shp = tuple(entries[label][2]["shape"])
            if base_idx and tuple(base_idx[name][2]["shape"]) != shp:
                problems[label].append(f"{name}: shape {list(shp)}, base has {base_idx[name][2]['shape']}")
                continue
            if base_idx and dt != base_idx[name][2]["dtype"]:
                problems[label].append(f"{name}: dtype {dt}, base has {base_idx[name][2]['dtype']}")
            shape = shp
            loaded[label] = (dt, raw, to_f32(dt, raw), ordered(raw) if dt == "BF16" else None)
        if not loaded:
            continue
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        rec = {"name": name, "shape": list(shape), "pairs": {}, "classes": {}}

        w = None
        if base_idx:
            bdt, braw = load_raw(base_idx[name])
            w = to_f32(bdt, braw)

        # -- reference
        layer = LAYER_RE.match(name)
        do_ref = with_ref and (ref_layers is None or layer is None or int(layer.group(1)) in ref_layers)
        ref = ref_bits = mixed = trim_band = sign_band = None
        cls_of = {}
        if do_ref:
            fraws = [load_raw(mi[name]) for mi in model_idx]
            if bdt == "BF16" and all(fdt == "BF16" and np.array_equal(fr, braw) for fdt, fr in fraws):
                # No model changes this tensor: the merge must be the base itself.
                ref, ref_bits, mixed = w, np.asarray(braw), np.zeros(n, dtype=np.float32)
                trim_band = sign_band = np.zeros(n, dtype=bool)
                rec["unchanged_by_all_models"] = True
            else:
                fts = [to_f32(fdt, fr) for fdt, fr in fraws]
                ref, mixed, trim_band, sign_band = ties_reference(w, fts, weights, args.density)
                del fts
                ref_bits = bf16_bits(ref)
            ref_elems += n
            ref_tensors += 1
            rec["ref_update_rms"] = rms(mixed)
            ord_ref = ordered(ref_bits)
            for label, (dt, raw, v, ordv) in loaded.items():
                cls = classify(dt, raw, v, ref, ref_bits, mixed, trim_band, sign_band, ordv, ord_ref)
                cls_of[label] = cls
                counts = np.bincount(cls, minlength=len(CLASSES))
                cls_tot[label] += counts
                rec["classes"][label] = {c: int(x) for c, x in zip(CLASSES, counts)}
                if counts[5] and len(examples[label]) < args.examples:
                    for pos in np.flatnonzero(cls == 5)[: args.examples - len(examples[label])]:
                        fv = [float(to_f32(fdt, fr[pos:pos + 1])[0]) for fdt, fr in fraws]
                        examples[label].append(
                            f"{name}[{pos}]: out {v[pos]:.6g}, reference {ref[pos]:.6g} "
                            f"(bf16 {float(to_f32('BF16', ref_bits[pos:pos + 1])[0]):.6g}), base {w[pos]:.6g}, "
                            f"deltas {[f'{x - w[pos]:.4g}' for x in fv]}")
                del cls
            del fraws

        # -- pairwise
        for (i, j) in pairs:
            la, lb = outs[i][0], outs[j][0]
            if la not in loaded or lb not in loaded:
                continue
            dta, rawa, va, orda = loaded[la]
            dtb, rawb, vb, ordb = loaded[lb]
            du = ulp_distance(dta, rawa, dtb, rawb, va, vb, orda, ordb)
            ad = np.abs(va - vb)
            ndiff = int(np.count_nonzero(ad)) if dta != dtb else int(np.count_nonzero(du) + np.count_nonzero((du == 0) & (ad > 0)))
            over = du > 1
            nover = int(np.count_nonzero(over))
            explained = None
            if do_ref and nover:
                ca, cb = cls_of[la], cls_of[lb]
                explained = int(np.count_nonzero(over & (ca < 5) & (cb < 5)))
            maxabs = float(ad.max()) if n else 0.0
            scale = rms(vb)
            rel = maxabs / scale if scale > 0 else (0.0 if maxabs == 0 else math.inf)
            rel_delta = None
            if w is not None:
                dscale = rms(vb - w)
                rel_delta = maxabs / dscale if dscale > 0 else (0.0 if maxabs == 0 else math.inf)
            t = pair_tot[(i, j)]
            t["n"] += n
            t["diff"] += ndiff
            t["over1"] += nover
            if explained is not None:
                t["over1_explained"] += explained
            elif nover:
                t.setdefault("over1_unreferenced", 0)
                t["over1_unreferenced"] += nover
            t["tensors_differ"] += 1 if ndiff else 0
            mu = int(du.max()) if n else 0
            if mu > t["max_ulp"]:
                t["max_ulp"] = mu
                t["worst"] = name
            t["max_abs"] = max(t["max_abs"], maxabs)
            t["max_rel"] = max(t["max_rel"], rel)
            if rel_delta is not None:
                t["max_rel_delta"] = max(t["max_rel_delta"], rel_delta)
            rec["pairs"][f"{la}~{lb}"] = dict(differ=ndiff, over_1ulp=nover, over_1ulp_explained=explained,
                                              max_ulp=mu, max_abs=maxabs, max_abs_rel_tensor_rms=rel,
                                              max_abs_rel_update_rms=rel_delta)
            del du, ad, over
        per_tensor.append(rec)
        if args.verbose:
            parts = []
            for k, p in rec["pairs"].items():
                parts.append(f"{k}: {p['differ']} differ, {p['over_1ulp']} >1ulp, max {p['max_ulp']} ulp")
            for k, c in rec["classes"].items():
                parts.append(f"{k} vs ref: " + " ".join(f"{c[x]}" for x in CLASSES))
            print(f"  {name} {list(shape)}: " + "; ".join(parts), flush=True)
        del loaded, ref, ref_bits, mixed, trim_band, sign_band, w, cls_of

    # -- summary
    elapsed = time.monotonic() - t0
    failed = False
    lines = []
    for (i, j), t in pair_tot.items():
        la, lb = outs[i][0], outs[j][0]
        if not t["n"]:
            lines.append(f"{la} vs {lb}: no tensors in common")
            continue
        if t["diff"] == 0:
            verdict = "IDENTICAL (bit for bit)"
        elif t["over1"] == 0:
            verdict = "WITHIN 1 BF16 ULP"
        elif t.get("over1_unreferenced"):
            verdict = "DIFFER by more than 1 ulp (not all tensors covered by the reference)"
        elif t["over1_explained"] == t["over1"]:
            verdict = "AGREE up to TIES ambiguities (every >1-ulp difference is a trim/sign tie or BF16 arithmetic)"
        else:
            verdict = f"DIFFER: {t['over1'] - t['over1_explained']} >1-ulp difference(s) not explained"
        lines.append(f"{la} vs {lb}: {verdict}")
        lines.append(f"    {t['n']} elements; differ {fmt_count(t['diff'], t['n'])} in {t['tensors_differ']} tensor(s); "
                     f"more than 1 ulp apart {fmt_count(t['over1'], t['n'])}"
                     + (f", of which explained by the reference classes {t['over1_explained']}" if t["over1"] and with_ref else ""))
        lines.append(f"    max {t['max_ulp']} ulp (in {t['worst']}), max |diff| {t['max_abs']:.3g} = "
                     f"{t['max_rel']:.3g} x tensor rms" + (f" = {t['max_rel_delta']:.3g} x rms of the merged update" if base_idx else ""))
    if with_ref:
        cov = "all tensors" if ref_layers is None else f"layers {args.ref_layers} + non-layer tensors"
        lines.append(f"reference (TIES in float32, mergekit semantics; weights {weights}, density {args.density}): "
                     f"{ref_tensors} tensors, {ref_elems} elements ({cov})")
    for label, _ in outs:
        if with_ref:
            c = cls_tot[label]
            tot = int(c.sum())
            lines.append(f"{label} vs reference: " + ", ".join(f"{k} {fmt_count(int(x), tot)}" for k, x in zip(CLASSES, c)))
            if c[5] > args.max_wrong:
                failed = True
                lines.append(f"    {label}: WRONG: {int(c[5])} element(s) outside every tolerance class")
                for e in examples[label]:
                    lines.append(f"      {e}")
        for p in problems[label]:
            failed = True
            lines.append(f"    {label}: PROBLEM: {p}")
    for l in lines:
        print(l)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"outputs": dict(outs), "weights": weights, "density": args.density,
                       "tensors": per_tensor, "problems": problems,
                       "classes": {k: {c: int(x) for c, x in zip(CLASSES, v)} for k, v in cls_tot.items()}},
                      f, indent=1)
    status = "FAIL" if failed else "OK"
    print(f"check_ties: {status}: {len(outs)} output(s), {len(per_tensor)} tensors"
          + (f", {ref_tensors} against the reference" if with_ref else "")
          + (f"; " + "; ".join(lines[0:1]) if pairs else "")
          + f" ({elapsed:.1f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

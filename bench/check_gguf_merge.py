#!/usr/bin/env python3
"""Compare GGUF merges of one LoRA into one GGUF base, tensor by tensor, with gguf-py.

    check_gguf_merge.py --base BASE.gguf --lora LORA.gguf LABEL=OUT.gguf [LABEL=OUT.gguf ...]

The first output is the one the others are compared with (bench/merge_gguf_vs_export_lora.sh
passes llama-export-lora's output first). For every output it reports

  * the metadata: KV keys missing, extra, or with other values than in the first output;
  * the tensors: same names, order, types and shapes as the first output;
  * merged tensors (those with NAME.lora_a and NAME.lora_b in LORA.gguf): max |diff| and the
    largest distance in units in the last place of the output type (F16 or F32) from the first
    output, and the number of elements that differ at all;
  * untouched tensors (every other one): whether their bytes equal the base's bytes;
  * (unless --no-ref) each merged tensor against a float64 reference of llama.cpp's formula,
        W' = dequant(W) + (alpha / rank) * lora_b @ lora_a      (rank = lora_b's inner size),
    rounded once to the output type, in ulps.

The LoRA is read in GGUF layout (q/k rows already permuted by convert_lora_to_gguf.py), so the
reference needs no permutation. gguf-py comes from llama.cpp's gguf-py directory: put it on
PYTHONPATH (the bench script does) or pass --gguf-py DIR.

Exit status: 0 when every output has the first output's tensor names, types and shapes, every
untouched tensor is byte-identical to the base, and every merged tensor is within --max-ulp ulps
of the first output (default 1); 1 otherwise; 2 on usage errors.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def load_gguf(gguf_py):
    if gguf_py:
        sys.path.insert(0, str(gguf_py))
    import gguf  # noqa: F401

    return gguf


def fields_of(reader):
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001 (very old gguf-py)
            v = [bytes(p).hex() for p in f.parts]
        out[name] = v
    return out


def ulp_ordered(a, kind):
    """Map float bit patterns onto integers whose difference is the distance in ulps."""
    if kind == "F16":
        bits = a.view(np.uint16).astype(np.int32)
        mag = bits & 0x7FFF
        return np.where(bits & 0x8000, -mag, mag)
    if kind == "F32":
        bits = a.view(np.uint32).astype(np.int64)
        mag = bits & 0x7FFFFFFF
        return np.where(bits & 0x80000000, -mag, mag)
    raise ValueError(kind)


def as_float(gguf, t):
    """A tensor's values as float32, in numpy (row-major, ggml ne reversed) shape."""
    T = gguf.GGMLQuantizationType
    if t.tensor_type == T.F32:
        return np.asarray(t.data, dtype=np.float32)
    if t.tensor_type == T.F16:
        return np.asarray(t.data, dtype=np.float16).astype(np.float32)
    if t.tensor_type == T.BF16:
        raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32)
    from gguf import quants

    return quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)


def raw_bytes(t):
    return np.asarray(t.data).reshape(-1).view(np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", metavar="LABEL=OUT.gguf")
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--lora", required=True, type=Path)
    ap.add_argument("--gguf-py", type=Path, default=None, help="llama.cpp's gguf-py directory")
    ap.add_argument("--max-ulp", type=int, default=1, help="allowed ulps between outputs (default 1)")
    ap.add_argument("--no-ref", action="store_true", help="skip the float64 reference")
    ap.add_argument("--per-tensor", type=Path, default=None, help="write a per-tensor table here")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    a = ap.parse_args()

    outs = []
    for spec in a.outputs:
        if "=" not in spec:
            ap.error("outputs are LABEL=PATH, got %r" % spec)
        label, path = spec.split("=", 1)
        outs.append((label, Path(path)))

    t0 = time.time()
    gguf = load_gguf(a.gguf_py)
    base = gguf.GGUFReader(a.base, "r")
    lora = gguf.GGUFReader(a.lora, "r")
    readers = [(label, gguf.GGUFReader(p, "r")) for label, p in outs]
    T = gguf.GGMLQuantizationType

    base_t = {t.name: t for t in base.tensors}
    lora_t = {t.name: t for t in lora.tensors}
    lf = fields_of(lora)
    alpha = float(lf.get("adapter.lora.alpha", 0.0) or 0.0)
    merged_names = [t.name for t in base.tensors if t.name + ".lora_a" in lora_t and t.name + ".lora_b" in lora_t]
    merged_set = set(merged_names)
    untouched_names = [t.name for t in base.tensors if t.name not in merged_set]

    problems = []
    report = {"base": str(a.base), "lora": str(a.lora), "alpha": alpha, "outputs": {}, "tensors": {}}
    lines = []

    ref_label, ref_reader = readers[0]
    ref_fields = fields_of(ref_reader)
    ref_tensors = {t.name: t for t in ref_reader.tensors}
    ref_order = [t.name for t in ref_reader.tensors]
    base_fields = fields_of(base)

    # ---- metadata and layout
    for label, r in readers:
        info = {"path": str(dict(outs)[label]), "size": Path(dict(outs)[label]).stat().st_size}
        fl = fields_of(r)
        info["kv_vs_base_changed"] = sorted(k for k in fl if k in base_fields and fl[k] != base_fields[k])
        info["kv_vs_base_extra"] = sorted(k for k in fl if k not in base_fields)
        info["kv_vs_base_missing"] = sorted(k for k in base_fields if k not in fl)
        info["kv_changed_values"] = {k: [str(base_fields[k]), str(fl[k])] for k in info["kv_vs_base_changed"]}
        info["data_offset"] = int(r.data_offset)
        names = [t.name for t in r.tensors]
        info["n_tensors"] = len(names)
        info["same_order_as_base"] = names == [t.name for t in base.tensors]
        info["same_order_as_first"] = names == ref_order
        types = {}
        for t in r.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        info["tensor_types"] = types
        mtypes = {}
        for n in merged_names:
            tt = {t.name: t for t in r.tensors}.get(n)
            k = tt.tensor_type.name if tt is not None else "missing"
            mtypes[k] = mtypes.get(k, 0) + 1
        info["merged_types"] = mtypes
        if set(names) != set(base_t):
            problems.append("%s: tensor names differ from the base's (%d vs %d)" % (label, len(names), len(base_t)))
        report["outputs"][label] = info

    # ---- tensors
    agg = {label: {"merged_max_abs": 0.0, "merged_max_ulp": 0, "merged_differ": 0, "merged_elems": 0,
                   "untouched_identical": 0, "untouched_differ": [], "ref_max_ulp": 0, "ref_1ulp": 0,
                   "ref_max_abs": 0.0, "ref_exact": 0}
           for label, _ in readers}
    per_kind = {}
    for name in base_t:
        bt = base_t[name]
        report["tensors"][name] = {"merged": name in merged_set, "base_type": bt.tensor_type.name, "outputs": {}}
    out_maps = [(label, {t.name: t for t in r.tensors}) for label, r in readers]

    for name in untouched_names:
        bb = raw_bytes(base_t[name])
        for label, m in out_maps:
            t = m.get(name)
            ok = t is not None and t.tensor_type == base_t[name].tensor_type and np.array_equal(raw_bytes(t), bb)
            report["tensors"][name]["outputs"][label] = {"identical_to_base": bool(ok)}
            if ok:
                agg[label]["untouched_identical"] += 1
            else:
                agg[label]["untouched_differ"].append(name)
                problems.append("%s: untouched tensor %s is not byte-identical to the base" % (label, name))

    # per-tensor table: one group of columns per output compared with the first, then the
    # reference columns (elements not equal to the correctly rounded value / max ulp from it)
    W_CMP = 27
    h1 = "%-26s %-5s %-5s" % ("", "", "")
    h2 = "%-26s %-5s %-5s" % ("tensor", "base", "out")
    for label, _ in out_maps[1:]:
        h1 += " | %-*s" % (W_CMP, ("%s - %s" % (label, ref_label))[:W_CMP])
        h2 += " | %10s %4s %11s" % ("max|diff|", "ulp", "differ")
    if not a.no_ref:
        h1 += " | vs f64 ref rounded once: elements off / max ulp"
        h2 += " |" + "".join(" %16s" % label[:16] for label, _ in out_maps)
    lines += [h1, h2]

    for name in merged_names:
        bt = base_t[name]
        la, lb = lora_t[name + ".lora_a"], lora_t[name + ".lora_b"]
        vals = {}
        for label, m in out_maps:
            t = m.get(name)
            if t is None:
                problems.append("%s: merged tensor %s missing" % (label, name))
                continue
            if t.tensor_type not in (T.F16, T.F32):
                problems.append("%s: merged tensor %s is %s (expected F16/F32)" % (label, name, t.tensor_type.name))
                continue
            vals[label] = (t.tensor_type.name, np.asarray(t.data).reshape(-1))
        rec = report["tensors"][name]
        rec["shape"] = [int(x) for x in bt.shape]
        kind = name.split(".")[-2] if name.startswith("blk.") else name
        pk = per_kind.setdefault(kind, {})
        row = "%-26s %-5s %-5s" % (name, bt.tensor_type.name, vals.get(ref_label, ("?",))[0])
        if ref_label in vals:
            rtype, rdata = vals[ref_label]
            rf = rdata.astype(np.float32)
            rord = ulp_ordered(rdata, rtype)
            for label, _ in out_maps[1:]:
                if label not in vals:
                    row += " | %-*s" % (W_CMP, "missing")
                    continue
                otype, odata = vals[label]
                if otype != rtype or odata.size != rdata.size:
                    problems.append("%s: %s is %s, %s's is %s" % (label, name, otype, ref_label, rtype))
                    row += " | %-*s" % (W_CMP, "type/shape differs")
                    continue
                d = np.abs(odata.astype(np.float32) - rf)
                mad = float(d.max()) if d.size else 0.0
                du = np.abs(ulp_ordered(odata, otype) - rord)
                ulp = int(du.max()) if du.size else 0
                ndiff = int(np.count_nonzero(du))
                rec["outputs"].setdefault(label, {}).update(
                    {"vs_first_max_abs": mad, "vs_first_max_ulp": ulp, "vs_first_differ": ndiff, "type": otype})
                g = agg[label]
                g["merged_max_abs"] = max(g["merged_max_abs"], mad)
                g["merged_max_ulp"] = max(g["merged_max_ulp"], ulp)
                g["merged_differ"] += ndiff
                g["merged_elems"] += int(odata.size)
                k = pk.setdefault(label, {"max_abs": 0.0, "max_ulp": 0, "differ": 0, "elems": 0, "n": 0})
                k["max_abs"] = max(k["max_abs"], mad)
                k["max_ulp"] = max(k["max_ulp"], ulp)
                k["differ"] += ndiff
                k["elems"] += int(odata.size)
                k["n"] += 1
                if ulp > a.max_ulp:
                    problems.append("%s: %s is %d ulp from %s's (max |diff| %.3g)" % (label, name, ulp, ref_label, mad))
                row += " | %10.3e %4d %11d" % (mad, ulp, ndiff)
        if not a.no_ref:
            A = as_float(gguf, la).astype(np.float64)  # (r, in)
            B = as_float(gguf, lb).astype(np.float64)  # (out, r)
            rank = B.shape[1]
            scale = alpha / rank if alpha else 1.0
            W = as_float(gguf, bt).astype(np.float64).reshape(B.shape[0], A.shape[1])
            ref = (W + scale * (B @ A)).reshape(-1)
            rec["ref_scale"] = scale
            refcols = []
            ref_ord = {}
            for label, _ in out_maps:
                if label not in vals:
                    continue
                otype, odata = vals[label]
                if otype not in ref_ord:
                    ref_ord[otype] = ulp_ordered(ref.astype(np.float16 if otype == "F16" else np.float32), otype)
                du = np.abs(ulp_ordered(odata, otype) - ref_ord[otype])
                mu = int(du.max()) if du.size else 0
                n1 = int(np.count_nonzero(du))
                mab = float(np.abs(odata.astype(np.float64) - ref).max())
                rec["outputs"].setdefault(label, {}).update({"vs_ref_max_ulp": mu, "vs_ref_differ": n1, "vs_ref_max_abs": mab})
                g = agg[label]
                g["ref_max_ulp"] = max(g["ref_max_ulp"], mu)
                g["ref_1ulp"] += n1
                g["ref_max_abs"] = max(g["ref_max_abs"], mab)
                k = pk.setdefault(label, {"max_abs": 0.0, "max_ulp": 0, "differ": 0, "elems": 0, "n": 0})
                k["ref_max_ulp"] = max(k.get("ref_max_ulp", 0), mu)
                k["ref_differ"] = k.get("ref_differ", 0) + n1
                k["ref_elems"] = k.get("ref_elems", 0) + int(odata.size)
                refcols.append(" %16s" % ("%d / %d" % (n1, mu)))
            row += " |" + "".join(refcols)
        lines.append(row)

    report["aggregate"] = agg
    report["per_kind"] = per_kind
    report["problems"] = problems
    report["seconds"] = round(time.time() - t0, 1)

    # ---- summary
    print("check_gguf_merge: base %s, lora %s (alpha %g), %d merged tensors, %d untouched"
          % (a.base.name, a.lora.name, alpha, len(merged_names), len(untouched_names)))
    for label, _ in readers:
        info = report["outputs"][label]
        g = agg[label]
        kv = []
        for k, (old, new) in info["kv_changed_values"].items():
            kv.append("%s %s -> %s" % (k, old, new))
        kv += ["+" + k for k in info["kv_vs_base_extra"]] + ["-" + k for k in info["kv_vs_base_missing"]]
        print("  %s: %s, %d bytes, %d tensors (%s), merged as %s; tensor order %s; KV vs base: %s"
              % (label, info["path"], info["size"], info["n_tensors"],
                 " ".join("%s x%d" % kv_ for kv_ in sorted(info["tensor_types"].items())),
                 " ".join("%s x%d" % kv_ for kv_ in sorted(info["merged_types"].items())),
                 "= base" if info["same_order_as_base"] else ("= %s" % ref_label if info["same_order_as_first"] else "differs"),
                 "; ".join(kv) or "identical"))
        print("    untouched tensors byte-identical to the base: %d of %d%s"
              % (g["untouched_identical"], len(untouched_names),
                 "" if not g["untouched_differ"] else " (differ: %s)" % ", ".join(g["untouched_differ"][:5])))
        if label != ref_label:
            print("    merged vs %s: max |diff| %.3e, max %d ulp, %d of %d elements differ (%.4f%%)"
                  % (ref_label, g["merged_max_abs"], g["merged_max_ulp"], g["merged_differ"], g["merged_elems"],
                     100.0 * g["merged_differ"] / max(g["merged_elems"], 1)))
        if not a.no_ref:
            tot = sum(k.get("ref_elems", 0) for pk_ in per_kind.values() for l2, k in pk_.items() if l2 == label)
            print("    merged vs float64 reference (rounded once): max %d ulp, %d of %d elements not the correctly rounded value (%.4f%%), max |out - ref| %.3e"
                  % (g["ref_max_ulp"], g["ref_1ulp"], tot, 100.0 * g["ref_1ulp"] / max(tot, 1), g["ref_max_abs"]))
    if len(readers) > 1:
        print("  per tensor kind (max over the layers), vs %s:" % ref_label)
        for kind, d in per_kind.items():
            parts = []
            for label, _ in out_maps[1:]:
                k = d.get(label)
                if k and k.get("n"):
                    parts.append("%s max|diff| %.3e, %d ulp, %d/%d differ" % (label, k["max_abs"], k["max_ulp"], k["differ"], k["elems"]))
            print("    %-12s %s" % (kind, "; ".join(parts)))
    if problems:
        print("  PROBLEMS (%d):" % len(problems))
        for p in problems[:20]:
            print("    " + p)
    verdict = "OK" if not problems else "FAIL"
    print("check_gguf_merge: %s (%d outputs, %d merged tensors within %d ulp of %s, %d untouched byte-identical) (%.1fs)"
          % (verdict, len(readers), len(merged_names), a.max_ulp, ref_label, len(untouched_names), time.time() - t0))

    if a.per_tensor:
        a.per_tensor.write_text("\n".join(lines) + "\n")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())

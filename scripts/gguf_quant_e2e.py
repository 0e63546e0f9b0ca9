#!/usr/bin/env python3
"""Driver for scripts/gguf-quant-e2e.sh (run that script, not this file directly).

End-to-end check of `adapterkit merge BASE_HF ADAPTER -o m.gguf --quant Q` (HF checkpoint + PEFT adapter -> merged,
converted and quantized GGUF in one pass) on the tiny Llama of fixtures/gguf:

  1. logits: llama.cpp (libllama, via the compiled fixtures/gguf/lora_logits.cpp, no adapter) on m.gguf vs
     transformers running the UNMERGED PEFT model (f32), max |diff| over all logits of one fixed token sequence.
  2. bytes: m.gguf vs the chain llama.cpp users run by hand,
        PEFT merge_and_unload() -> save_pretrained() (f32, as the base) -> convert_hf_to_gguf.py --outtype f32
        -> llama-quantize <Q>             (q8_0, q4_k_m, ...)
        convert_hf_to_gguf.py --outtype f16 / f32 directly          (f16, f32)
     tensor by tensor (name, type, shape, bytes) and KV by KV (set, types, values).
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)

ap = argparse.ArgumentParser()
ap.add_argument("--adapterkit", required=True)
ap.add_argument("--lora-logits", required=True)
ap.add_argument("--llama-cpp", required=True)
ap.add_argument("--fixtures", required=True)
ap.add_argument("--work", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--meta", default="")
ap.add_argument("--cases", default="plain,patterns,rslora,embed_head,lora_bias,dora")
ap.add_argument("--quants", default="f32,f16,q8_0,q4_k_m")
ap.add_argument("--bf16-quants", default="bf16,f16,q8_0,q4_k_m",
                help="quants for the bf16 copy of the base ('' to skip the bf16 base)")
ap.add_argument("--f16-tol", type=float, default=1e-2)
ap.add_argument("--q8-tol", type=float, default=2e-2)
args = ap.parse_args()

T0 = time.time()
FIX = Path(args.fixtures).resolve()
WORK = Path(args.work).resolve()
LLAMA = Path(args.llama_cpp).resolve()
AK = args.adapterkit
RT = args.lora_logits
QUANTIZE = LLAMA / "build/bin/llama-quantize"
CONVERT = LLAMA / "convert_hf_to_gguf.py"
sys.path.insert(1, str(LLAMA / "gguf-py"))

import numpy as np
import torch
import gguf
import peft
import transformers
from gguf import GGMLQuantizationType as QT
from peft import PeftModel
from transformers import LlamaForCausalLM

torch.set_num_threads(1)
torch.manual_seed(0)

MANIFEST = json.loads((FIX / "manifest.json").read_text())
TOKENS = MANIFEST["base_runtime_check"]["tokens"]
VOCAB = MANIFEST["model"]["vocab"]
CASES = [c for c in args.cases.split(",") if c]
QUANTS = {"f32": [q for q in args.quants.split(",") if q], "bf16": [q for q in args.bf16_quants.split(",") if q]}
BASES = [b for b in ("f32", "bf16") if QUANTS[b]]
F32_TOL = 1e-5
TOL = {"f32": F32_TOL, "f16": args.f16_tol, "q8_0": args.q8_tol}  # others: information only
QTYPE_NAME = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q2_k": "Q2_K",
              "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M",
              "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
for q in QUANTS["f32"] + QUANTS["bf16"]:
    if q not in QTYPE_NAME and q not in ("f32", "f16", "bf16"):
        sys.exit(f"unknown quant {q}")

problems, notes = [], []


def run(cmd, cwd=None, log=None):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd or WORK, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    if log:
        Path(log).write_text(" ".join(map(str, cmd)) + "\n\n" + p.stdout)
    return p.returncode, p.stdout.strip()


def last_line(text):
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def llama_logits(model):
    out = WORK / "logits.bin"
    if out.exists():
        out.unlink()
    rc, text = run([RT, model, out, ",".join(map(str, TOKENS))])
    if rc != 0:
        return None, f"lora_logits rc={rc}: {last_line(text)}"
    lg = np.fromfile(out, dtype=np.float32)
    if lg.size != len(TOKENS) * VOCAB:
        return None, f"lora_logits wrote {lg.size} floats, expected {len(TOKENS) * VOCAB}"
    return lg.reshape(len(TOKENS), VOCAB), None


def hf_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits[0].float().numpy()


def maxdiff(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# ------------------------------------------------------------------------------------------------
# GGUF comparison
# ------------------------------------------------------------------------------------------------
def kv_of(r):
    kv = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001
            v = [bytes(p).hex() for p in f.parts]
        kv[k] = ([t.name for t in f.types], v)
    return kv


def short(v, n=70):
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def dequant(t):
    data = np.asarray(t.data)
    if t.tensor_type == QT.F32:
        return data.astype(np.float32).ravel()
    if t.tensor_type == QT.F16:
        return data.view(np.float16).astype(np.float32).ravel()
    return gguf.quants.dequantize(data, t.tensor_type).astype(np.float32).ravel()


def compare_gguf(ak_path, ref_path):
    """Returns a dict: tensor counts, list of tensor differences (with details), KV differences, order notes."""
    a, b = gguf.GGUFReader(str(ak_path)), gguf.GGUFReader(str(ref_path))
    res = {"n_ak": len(a.tensors), "n_ref": len(b.tensors), "same": 0, "diff": [], "kv": [], "order": [],
           "types": {}}
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    for n in sorted(set(ta) - set(tb)):
        res["diff"].append(f"{n}: only in adapterkit's output ({ta[n].tensor_type.name})")
    for n in sorted(set(tb) - set(ta)):
        res["diff"].append(f"{n}: only in the reference ({tb[n].tensor_type.name})")
    if [t.name for t in a.tensors if t.name in tb] != [t.name for t in b.tensors if t.name in ta]:
        res["order"].append("tensor order differs")
    for t in b.tensors:
        n = t.name
        if n not in ta:
            continue
        x, y = ta[n], t
        res["types"][y.tensor_type.name] = res["types"].get(y.tensor_type.name, 0) + 1
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            res["diff"].append(f"{n}: type/shape {x.tensor_type.name} {list(map(int, x.shape))} vs reference "
                               f"{y.tensor_type.name} {list(map(int, y.shape))}")
            continue
        xb = bytes(a.data[x.data_offset: x.data_offset + x.n_bytes])
        yb = bytes(b.data[y.data_offset: y.data_offset + y.n_bytes])
        if xb == yb:
            res["same"] += 1
            continue
        xa, ya = np.frombuffer(xb, np.uint8), np.frombuffer(yb, np.uint8)
        if xa.size != ya.size:
            res["diff"].append(f"{n}: {y.tensor_type.name} {xa.size} bytes vs reference {ya.size}")
            continue
        ne = np.nonzero(xa != ya)[0]
        off = int(ne[0])
        bs, ts = gguf.GGML_QUANT_SIZES[y.tensor_type]
        nblk = len(np.unique(ne // ts))
        d = maxdiff(dequant(x), dequant(y))
        ulp = ""
        if y.tensor_type in (QT.F32, QT.F16):
            it = np.int32 if y.tensor_type == QT.F32 else np.int16
            sign = np.int64(1) << (32 if y.tensor_type == QT.F32 else 16) - 1
            ia, ib = (np.frombuffer(v, it).astype(np.int64) for v in (xb, yb))
            ia, ib = (np.where(v < 0, -(v & (sign - 1)), v) for v in (ia, ib))
            u = np.abs(ia - ib)
            ulp = f", {int((u > 0).sum())} of {u.size} values differ, by at most {int(u.max())} ulp ({int((u == 1).sum())} by 1 ulp)"
        lo = off - off % ts
        w0, w1 = max(lo, off - 4), min(lo + ts, off + 8)
        res["diff"].append(
            f"{n}: {y.tensor_type.name} {list(map(int, y.shape))}: {ne.size} of {xa.size} bytes differ in {nblk} of "
            f"{xa.size // ts} blocks ({bs} values/{ts} bytes); first at byte {off} = block {off // ts} byte {off % ts}; "
            f"block bytes {w0 - lo}..{w1 - lo - 1}: adapterkit {xb[w0:w1].hex()} vs reference {yb[w0:w1].hex()}; "
            f"max |dequantized diff| {d:.3e}{ulp}")
    ka, kb = kv_of(a), kv_of(b)
    for k in sorted(set(ka) - set(kb)):
        res["kv"].append(f"{k}: only in adapterkit's output = {short(ka[k][1])}")
    for k in sorted(set(kb) - set(ka)):
        res["kv"].append(f"{k}: only in the reference = {short(kb[k][1])}")
    for k in sorted(set(ka) & set(kb)):
        (tya, va), (tyb, vb) = ka[k], kb[k]
        if tya != tyb:
            res["kv"].append(f"{k}: type {'/'.join(tya)} vs reference {'/'.join(tyb)} (values {short(va, 40)} / "
                             f"{short(vb, 40)})")
        elif va != vb:
            if isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
                i = next(i for i in range(len(va)) if va[i] != vb[i])
                res["kv"].append(f"{k}: arrays of {len(va)} differ first at [{i}]: {short(va[i], 40)} vs reference "
                                 f"{short(vb[i], 40)}")
            else:
                res["kv"].append(f"{k}: {short(va, 50)} vs reference {short(vb, 50)}")
    if [k for k in ka if k in kb] != [k for k in kb if k in ka]:
        res["order"].append("KV order differs")
    aal = a.alignment if hasattr(a, "alignment") else None
    bal = b.alignment if hasattr(b, "alignment") else None
    if aal != bal:
        res["kv"].append(f"alignment {aal} vs reference {bal}")
    res["size"] = (os.path.getsize(ak_path), os.path.getsize(ref_path))
    res["identical_file"] = Path(ak_path).read_bytes() == Path(ref_path).read_bytes()
    return res


# ------------------------------------------------------------------------------------------------
# bases: the fixture's f32 base_hf, and (for BASES with bf16) the same weights rounded to bf16
# ------------------------------------------------------------------------------------------------
tok_files = [p for p in (FIX / "base_hf").iterdir() if p.name.startswith("tokenizer")]
BASE_DIR = {"f32": FIX / "base_hf"}
if "bf16" in BASES:
    d = WORK / "bf16" / "base_hf"
    d.mkdir(parents=True)
    LlamaForCausalLM.from_pretrained(str(FIX / "base_hf"), dtype=torch.bfloat16).save_pretrained(str(d))
    for p in tok_files:
        shutil.copy(p, d / p.name)
    BASE_DIR["bf16"] = d
TORCH_DT = {"f32": torch.float32, "bf16": torch.bfloat16}


def load_base(bt="f32", dtype=torch.float32):
    return LlamaForCausalLM.from_pretrained(str(BASE_DIR[bt]), dtype=dtype).eval()


def chain_of(bt, q):
    """(convert_hf_to_gguf --outtype, llama-quantize type or None) of the reference chain for base dtype bt."""
    if q in ("f32", "f16", "bf16"):
        return q, None
    return bt, QTYPE_NAME[q]


# ------------------------------------------------------------------------------------------------
# references: unmerged PEFT logits (f32 forward; a bf16 base is upcast exactly); merged checkpoints for the chain
# ------------------------------------------------------------------------------------------------
HF_BASE = hf_logits(load_base())
PEFT, DELTA = {}, {}
REFDIR = {}
for bt in BASES:
    for case in CASES:
        pm = PeftModel.from_pretrained(load_base(bt), str(FIX / case / "adapter")).eval()
        PEFT[(bt, case)] = hf_logits(pm)
        if bt == "f32":
            DELTA[case] = maxdiff(PEFT[(bt, case)], HF_BASE)
        if bt != "f32":
            # the chain merges in the base's own dtype, as a user would (PEFT keeps the adapter in f32)
            del pm
            pm = PeftModel.from_pretrained(load_base(bt, TORCH_DT[bt]), str(FIX / case / "adapter")).eval()
        merged = pm.merge_and_unload()
        # the directory is named base_hf like the base: convert_hf_to_gguf.py derives general.name etc. from it
        d = WORK / "ref" / bt / case / "base_hf"
        d.mkdir(parents=True)
        merged.save_pretrained(str(d))
        for p in tok_files:
            shutil.copy(p, d / p.name)
        REFDIR[(bt, case)] = d
        dt = {str(v.dtype) for v in merged.state_dict().values()}
        if dt != {str(TORCH_DT[bt])}:
            notes.append(f"{case} on the {bt} base: merged PEFT model has dtypes {sorted(dt)}")
        del pm, merged
t_ref = time.time() - T0

# the reference chain
t1 = time.time()
REF, REF_ERR = {}, {}
conv_warn = {}
for bt in BASES:
    for case in CASES:
        d = REFDIR[(bt, case)]
        converted = {}
        for q in QUANTS[bt]:
            outtype, qt = chain_of(bt, q)
            if outtype not in converted:
                out = d.parent / f"conv_{outtype}.gguf"
                rc, text = run([sys.executable, CONVERT, d, "--outtype", outtype, "--outfile", out],
                               log=d.parent / f"conv_{outtype}.log")
                if rc != 0:
                    converted[outtype] = (None, f"convert_hf_to_gguf --outtype {outtype} rc={rc}: {last_line(text)}")
                else:
                    converted[outtype] = (out, None)
                    w = sorted({l.split(":", 2)[-1].strip()[:120] for l in text.splitlines() if l.startswith("WARNING")})
                    if w:
                        conv_warn.setdefault(outtype, set()).update(w)
            src, err = converted[outtype]
            if err:
                REF_ERR[(bt, case, q)] = err
                continue
            if qt is None:
                REF[(bt, case, q)] = src
                continue
            out = d.parent / f"ref_{q}.gguf"
            rc, text = run([QUANTIZE, src, out, qt, "1"], log=d.parent / f"quantize_{q}.log")
            if rc != 0:
                REF_ERR[(bt, case, q)] = f"llama-quantize {qt} rc={rc}: {last_line(text)}"
                continue
            REF[(bt, case, q)] = out
            fbs = re.findall(r"required for type\s+(\S+)\).*?-> falling back to\s+(\S+)", text)
            if fbs:
                pairs = sorted({f"{a}->{b}" for a, b in fbs})
                notes.append(f"llama-quantize {qt}: {len(fbs)} tensor(s) with ne[0] not a multiple of 256 fell back "
                             f"({', '.join(pairs)})")
t_chain = time.time() - t1

# ------------------------------------------------------------------------------------------------
# adapterkit merge --quant, logits, bytes
# ------------------------------------------------------------------------------------------------
t2 = time.time()
rows = []
for bt in BASES:
    for case in CASES:
        for q in QUANTS[bt]:
            row = {"base": bt, "case": case, "q": q}
            tag = f"{case} {q}" + ("" if bt == "f32" else f" ({bt} base)")
            m = WORK / f"ak_{bt}_{case}_{q}.gguf"
            rc, text = run([AK, "merge", BASE_DIR[bt], FIX / case / "adapter", "-o", m, "--quant", q],
                           log=WORK / f"ak_{bt}_{case}_{q}.log")
            if rc != 0:
                row["error"] = f"adapterkit rc={rc}: {last_line(text)}"
                problems.append(f"{tag}: {row['error']}")
                rows.append(row)
                continue
            lg, err = llama_logits(m)
            if err:
                row["error"] = "llama.cpp: " + err
                problems.append(f"{tag}: llama.cpp could not run adapterkit's output: {err}")
                rows.append(row)
                continue
            ref_lg = PEFT[(bt, case)]
            row["logits"] = maxdiff(lg, ref_lg)
            ref = REF.get((bt, case, q))
            if ref is None:
                row["ref_error"] = REF_ERR.get((bt, case, q), "no reference")
                notes.append(f"{tag}: reference chain failed: {row['ref_error']}")
            else:
                rlg, rerr = llama_logits(ref)
                row["ref_logits"] = rerr or maxdiff(rlg, ref_lg)
                if not rerr:
                    row["ak_vs_ref"] = maxdiff(lg, rlg)
                row["cmp"] = compare_gguf(m, ref)
                c = row["cmp"]
                # diagnosis: adapterkit quantize of the chain's own PEFT-merged checkpoint (same merged weights in)
                rq = WORK / f"rq_{bt}_{case}_{q}.gguf"
                rrc, rtext = run([AK, "quantize", REFDIR[(bt, case)], "-o", rq, "--type", q], log=WORK / f"rq_{bt}_{case}_{q}.log")
                if rrc != 0:
                    row["requant"] = f"adapterkit quantize rc={rrc}: {last_line(rtext)}"
                    problems.append(f"{tag}: {row['requant']}")
                else:
                    row["requant"] = compare_gguf(rq, ref)
                    for x in row["requant"]["diff"] + row["requant"]["kv"]:
                        problems.append(f"{tag}: adapterkit quantize of PEFT's merged checkpoint differs from the chain: {x}")
                if c["diff"]:
                    # The merge itself rounds once in f32 where PEFT rounds its delta first (and, for
                    # embeddings, rounds the delta to the model dtype): a few ulp, not a failure as
                    # long as `requant` (conversion + quantization alone) is byte-identical.
                    notes.append(f"{tag}: {len(c['diff'])} merged tensor(s) differ from the chain by merge rounding (requant identical)")
                if c["kv"]:
                    problems.append(f"{tag}: {len(c['kv'])} KV difference(s) from the reference chain")
            tol = TOL.get(q)
            if bt == "bf16" and q in ("bf16", "f32"):
                # the merged weights are rounded to bf16, so the f32-tight tolerance does not apply
                tol = TOL["f16"]
            if tol is not None:
                ok = row["logits"] <= tol
                row["verdict"] = "PASS" if ok else "FAIL"
                if not ok:
                    problems.append(f"{tag}: logits vs unmerged PEFT {row['logits']:.3e} > {tol:g}")
            else:
                row["verdict"] = "info"
            rows.append(row)
t_ak = time.time() - t2

# llama.cpp's own error of each type on the base (no adapter), for the tolerance
BASE_ERR = {}
for bt in ["f32", "f16", "q8_0"]:
    p = FIX / f"base_{bt}.gguf"
    if p.exists():
        lg, err = llama_logits(p)
        BASE_ERR[bt] = err or maxdiff(lg, HF_BASE)

# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def f(x):
    return f"{x:.2e}" if isinstance(x, float) else ("-" if x is None else str(x))


L = []
now = datetime.datetime.now().astimezone()
L.append(f"adapterkit merge BASE_HF ADAPTER --quant Q, run in llama.cpp, vs unmerged PEFT and vs the PEFT -> convert -> "
         f"llama-quantize chain -- {now.isoformat(timespec='seconds')}")
L.append("script: scripts/gguf-quant-e2e.sh (+ scripts/gguf_quant_e2e.py)")
L.append("")
L.append("versions")
for line in args.meta.splitlines():
    if line.strip():
        L.append(f"  {line}")
L.append(f"  llama.cpp: {MANIFEST['versions']['llama_cpp']} (build at {LLAMA})")
L.append(f"  peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
         f"numpy {np.__version__}, gguf-py {MANIFEST['versions'].get('gguf_py')}, python {platform.python_version()}")
L.append("")
L.append("setup")
L.append(f"  model: fixtures/gguf/base_hf (LlamaForCausalLM, hidden 32, 2 layers, vocab {VOCAB}, f32, q/k/v/o/mlp biases)")
L.append(f"  prompt tokens (fixtures/gguf/manifest.json base_runtime_check.tokens): {TOKENS}; metric = max |logit diff| over "
         f"all {len(TOKENS)}x{VOCAB} logits")
L.append("  llama.cpp: lora_logits.cpp -> libllama, CPU, 1 thread, n_ctx 64, KV cache F32, flash attention off")
L.append("  reference logits: transformers LlamaForCausalLM(base_hf, f32) + PeftModel.from_pretrained(<case>/adapter), "
         "UNMERGED forward")
L.append("  adapterkit: adapterkit merge BASE fixtures/gguf/<case>/adapter -o m.gguf --quant <Q>")
L.append("  reference chain: PeftModel(BASE model in its dtype, <case>/adapter).merge_and_unload().save_pretrained(DIR/base_hf)"
         " (tokenizer files copied), then")
for bt in BASES:
    for q in QUANTS[bt]:
        ot, qt = chain_of(bt, q)
        L.append(f"     {bt} base, {q:<7} convert_hf_to_gguf.py DIR/base_hf --outtype {ot}"
                 + (f" ; llama-quantize conv.gguf out.gguf {qt} 1" if qt else ""))
L.append("  BASE: f32 = fixtures/gguf/base_hf (f32, as generated)"
         + ("; bf16 = the same model saved in bf16 (torch RNE), so merges are rounded to bf16 before conversion; its "
            "reference logits are the f32 forward of the unmerged PEFT model on the bf16 weights (upcast exactly)"
            if "bf16" in BASES else ""))
L.append("")
L.append("logit scale and llama.cpp's own error of each weight type (base model, no adapter, vs transformers f32):")
L.append(f"  base logits: max |x| {np.abs(HF_BASE).max():.3f}, std {HF_BASE.std():.3f}; "
         + ", ".join(f"base_{k}.gguf {f(v)}" for k, v in BASE_ERR.items()))
L.append("  how far each adapter moves the logits (PEFT unmerged vs base): "
         + ", ".join(f"{c} {DELTA[c]:.2f}" for c in CASES))
L.append("  max |logit| of the unmerged PEFT model: " + ", ".join(f"{c} {np.abs(PEFT[('f32', c)]).max():.3f}" for c in CASES))
L.append(f"  tolerances: f32 {F32_TOL:g}, f16 {args.f16_tol:g} (the issue's bar), q8_0 {args.q8_tol:g}, bf16 base "
         f"bf16/f32 {args.f16_tol:g}; others information only")
L.append("")
L.append("1. logits and bytes")
L.append("   logits  = llama.cpp(adapterkit m.gguf) vs unmerged PEFT ; chain = llama.cpp(reference chain's file) vs "
         "unmerged PEFT ; ak-chain = between the two llama.cpp runs")
L.append("   bytes   = tensors with the same name, type, shape and bytes as the chain's file / tensors in the chain's file")
hdr = (f"   {'base':<5}{'case':<11}{'quant':<8}{'verdict':<8}{'logits':>10}{'chain':>10}{'ak-chain':>10}  {'bytes':<8}{'KV':<9}"
       f"{'file':<10}{'requant':<9}types (chain's file)")
L.append(hdr)
L.append("   " + "-" * (len(hdr) - 3))
details = []
for r in rows:
    if "error" in r:
        L.append(f"   {r['base']:<5}{r['case']:<11}{r['q']:<8}{'FAIL':<8}  {r['error']}")
        continue
    c = r.get("cmp")
    if c:
        bts = f"{c['same']}/{c['n_ref']}"
        kvs = "same" if not c["kv"] else f"{len(c['kv'])} diff"
        fil = "identical" if c["identical_file"] else ("reorder" if not c["diff"] and not c["kv"] else "differs")
        types = ",".join(f"{k}x{v}" for k, v in sorted(c["types"].items()))
        tag = f"{r['base']} base, {r['case']} {r['q']}"
        for x in c["diff"]:
            details.append(f"{tag}: tensor {x}")
        for x in c["kv"]:
            details.append(f"{tag}: KV {x}")
        for x in c["order"]:
            details.append(f"{tag}: {x} (harmless)")
        rq = r.get("requant")
        if isinstance(rq, dict):
            rqs = f"{rq['same']}/{rq['n_ref']}" + ("" if not rq["kv"] else "+KV")
        else:
            rqs = "error"
    else:
        bts, kvs, fil, rqs, types = "-", "-", "-", "-", r.get("ref_error", "")
    L.append(f"   {r['base']:<5}{r['case']:<11}{r['q']:<8}{r['verdict']:<8}{f(r['logits']):>10}{f(r.get('ref_logits')):>10}"
             f"{f(r.get('ak_vs_ref')):>10}  {bts:<8}{kvs:<9}{fil:<10}{rqs:<9}{types}")
L.append("   file: identical = the two files are byte-identical; reorder = same tensors and KVs, only the order (and so "
         "offsets) differ")
L.append("   requant: `adapterkit quantize DIR/base_hf -o x.gguf --type <Q>` on the chain's own PEFT-merged checkpoint vs the "
         "chain's file (identical tensors; +KV = KV differences): the same merged weights in, so this checks adapterkit's")
L.append("            converter + quantizer alone; where requant is complete but bytes is not, the difference is in the merge "
         "arithmetic (merged values that round differently from PEFT's)")
L.append("")
if details:
    L.append("differences from the reference chain")
    seen = set()
    for d in details:
        if d not in seen:
            L.append(f"  - {d}")
            seen.add(d)
    L.append("")
if conv_warn:
    for ot, w in conv_warn.items():
        notes.append(f"convert_hf_to_gguf --outtype {ot} warnings: {' | '.join(sorted(w))[:300]}")
if notes:
    L.append("notes")
    seen = set()
    for n in notes:
        if n not in seen:
            L.append(f"  - {n}")
            seen.add(n)
    L.append("")
n_logit = sum(1 for r in rows if r.get("verdict") == "PASS")
n_tol = sum(1 for r in rows if r.get("verdict") in ("PASS", "FAIL") or "error" in r)
n_cmp = sum(1 for r in rows if r.get("cmp"))
n_same = sum(1 for r in rows if r.get("cmp") and not r["cmp"]["diff"] and not r["cmp"]["kv"])
n_ident = sum(1 for r in rows if r.get("cmp") and r["cmp"]["identical_file"])
L.append(f"logits: {n_logit} of {n_tol} rows with a tolerance pass; bytes: {n_same} of {n_cmp} files have the chain's "
         f"tensors (names, types, shapes, bytes) and KVs, {n_ident} of them byte-identical files")
L.append(f"RESULT: {'FAIL' if problems else 'PASS'} ({len(problems)} problem(s))")
for p in problems:
    L.append(f"  - {p}")
L.append(f"wall time: {time.time() - T0:.1f} s (PEFT references + merged checkpoints {t_ref:.1f} s, reference chain "
         f"{t_chain:.1f} s, adapterkit + llama.cpp + comparisons {t_ak:.1f} s)")

text = "\n".join(L) + "\n"
print(text, end="")
Path(args.out).write_text(text)
print(f"written to {args.out}")
sys.exit(1 if problems else 0)

#!/usr/bin/env python3
"""Driver for scripts/gguf-llamacpp-check.sh (run that script, not this file directly).

Checks that GGUF files written by adapterkit load and run in llama.cpp with the right numbers:

  1. merge: `adapterkit merge base_<T>.gguf <case>/adapter -o m.gguf`, then llama.cpp (libllama, via the compiled
     fixtures/gguf/lora_logits.cpp, no adapter) on m.gguf vs transformers running the UNMERGED PEFT model.
  2. convert: `adapterkit convert <case>/adapter --to gguf --base base_hf -o a.gguf`, then llama.cpp base_f32.gguf +
     runtime LoRA a.gguf vs the unmerged PEFT model; the same with the fixture's llama.cpp-converted adapter_f32.gguf.

All comparisons are the max abs difference of the logits over all positions of one fixed token sequence (the one
the fixture generator uses, from fixtures/gguf/manifest.json). llama.cpp runs with an F32 KV cache and flash
attention off (lora_logits.cpp), so an f32 comparison is tight (~1e-7).
"""

import argparse
import datetime
import json
import os
import platform
import re
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
ap.add_argument("--meta", default="", help="extra 'key=value' lines (versions gathered by the shell script)")
args = ap.parse_args()

T0 = time.time()
FIX = Path(args.fixtures).resolve()
WORK = Path(args.work).resolve()
AK = args.adapterkit
RT = args.lora_logits
sys.path.insert(1, str(Path(args.llama_cpp) / "gguf-py"))  # the gguf-py llama.cpp's own converters use

import numpy as np
import torch
import gguf
import peft
import transformers
from gguf import GGMLQuantizationType as QT
from peft import PeftModel
from safetensors import safe_open
from transformers import LlamaForCausalLM

torch.set_num_threads(1)
torch.manual_seed(0)

MANIFEST = json.loads((FIX / "manifest.json").read_text())
TOKENS = MANIFEST["base_runtime_check"]["tokens"]  # [47, 83, 38, 53, 76, 116, 24, 121] in the current fixtures
N_HEAD = MANIFEST["model"]["n_head"]
N_HEAD_KV = MANIFEST["model"]["n_head_kv"]
VOCAB = MANIFEST["model"]["vocab"]
NAME_MAP = MANIFEST["tensor_name_map"]  # HF name -> GGUF name

F32_TOL = 1e-5  # f32 base / f32 adapter: llama.cpp vs transformers agree to ~1e-7 here
MERGE_CASES = ["plain", "patterns", "rslora", "embed_head", "lora_bias", "dora"]
CONVERT_CASES = ["plain", "patterns", "rslora", "embed_head"]
EXTRA_CONVERT_CASES = ["lora_bias", "dora"]  # llama.cpp cannot represent these; see what adapterkit does

problems = []  # adapterkit rows that fail
warns = []  # adapterkit output that works but is not quite right
notes = []
UMASK = os.umask(0)
os.umask(UMASK)


def check_mode(path):
    mode = os.stat(path).st_mode & 0o777
    want = 0o666 & ~UMASK
    if mode != want:
        w = f"adapterkit writes its outputs with mode {mode:o}, not {want:o} (0666 & ~umask {UMASK:03o})"
        if w not in warns:
            warns.append(w)


def run(cmd, cwd=WORK):
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p.returncode, (p.stdout + p.stderr).strip()


def llama_logits(model, adapters=()):
    """llama.cpp logits [n_tokens, vocab] for TOKENS; adapters = [(path, scale)] applied at runtime."""
    out = WORK / "logits.bin"
    if out.exists():
        out.unlink()
    cmd = [RT, str(model), str(out), ",".join(map(str, TOKENS))]
    for p, s in adapters:
        cmd += [str(p), repr(float(s))]
    rc, text = run(cmd)
    if rc != 0:
        return None, f"lora_logits rc={rc}: {text.splitlines()[-1] if text else ''}"
    lg = np.fromfile(out, dtype=np.float32)
    if lg.size != len(TOKENS) * VOCAB:
        return None, f"lora_logits wrote {lg.size} floats, expected {len(TOKENS) * VOCAB}"
    return lg.reshape(len(TOKENS), VOCAB), None


def load_base():
    return LlamaForCausalLM.from_pretrained(str(FIX / "base_hf"), dtype=torch.float32).eval()


def hf_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits[0].float().numpy()


def maxdiff(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def unpermute(w, n):
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_of(gname):
    if re.search(r"\.attn_q\.(weight|bias)$", gname):
        return N_HEAD
    if re.search(r"\.attn_k\.(weight|bias)$", gname):
        return N_HEAD_KV
    return None


def read_gguf(path):
    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts = {}
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == QT.F32:
            vals = data.astype(np.float32)
        elif t.tensor_type == QT.F16:
            vals = data.view(np.float16).astype(np.float32) if data.dtype != np.float16 else data.astype(np.float32)
        else:
            vals = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32)
        ne = [int(x) for x in t.shape]
        ts[t.name] = (t.tensor_type.name, vals.reshape(list(reversed(ne))))
    return kv, ts, [t.name for t in r.tensors]


def merged_tensor_check(m_path, base_path, case):
    """Tensor-level: adapterkit's merged GGUF (un-permuted) vs PEFT merge_and_unload (fixture
    <case>/merged_peft.safetensors). Returns (max diff over tensors PEFT changed, worst tensor, type summary, issues)."""
    kv, out, order = read_gguf(m_path)
    bkv, base, border = read_gguf(base_path)
    issues = []
    if set(out) != set(base):
        issues.append(f"tensor set differs from base: +{sorted(set(out) - set(base))} -{sorted(set(base) - set(out))}")
    if order != border:
        notes.append(f"merge {case} {Path(base_path).name}: output tensor order differs from the base's (harmless)")
    with safe_open(str(FIX / case / "merged_peft.safetensors"), "np") as fh:
        pm = {k: fh.get_tensor(k) for k in fh.keys()}
    worst, worst_name = 0.0, None
    changed_types = {}
    for hname, w in pm.items():
        g = NAME_MAP[hname]
        if g not in out:
            continue
        ty, vals = out[g]
        n = heads_of(g)
        back = unpermute(vals, n) if n else vals
        b_ty, b_vals = base[g]
        b_back = unpermute(b_vals, n) if n else b_vals
        if ty != b_ty and not (b_ty not in ("F32", "F16", "BF16") and ty == "F16"):
            # quantized targets are documented to come out F16 (what llama-export-lora writes); nothing else may change
            issues.append(f"{g}: type {b_ty} in base but {ty} in output")
        # only tensors PEFT changed (the rest must be copied bit-exactly)
        if np.array_equal(w, pm_base[hname]):
            if not np.array_equal(vals, b_vals):
                issues.append(f"{g}: not changed by the adapter but differs from the base ({maxdiff(vals, b_vals):.2e})")
            continue
        changed_types[ty] = changed_types.get(ty, 0) + 1
        d = maxdiff(back, w)
        if d > worst:
            worst, worst_name = d, g
    ft = kv.get("general.file_type")
    bft = bkv.get("general.file_type")
    requant = sorted({base[g][0] for g in out if g in base and base[g][0] != out[g][0]})
    if requant and ft == bft:
        w = (f"merge into a {'/'.join(requant)} base writes the merged targets as F16 but keeps general.file_type={ft} "
             f"from the base (llama-export-lora writes 1 = MOSTLY_F16); llama.cpp only prints it, so harmless")
        if w not in warns:
            warns.append(w)
    elif ft != bft:
        notes.append(f"merge {case} {Path(base_path).name}: general.file_type {ft} (base {bft})")
    return worst, worst_name, changed_types, issues


with safe_open(str(FIX / "base_hf/model.safetensors"), "np") as fh:
    pm_base = {k: fh.get_tensor(k).astype(np.float32) for k in fh.keys()}

# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
base_model = load_base()
HF_BASE = hf_logits(base_model)
PEFT = {}
for case in sorted(set(MERGE_CASES + CONVERT_CASES + EXTRA_CONVERT_CASES)):
    pm = PeftModel.from_pretrained(load_base(), str(FIX / case / "adapter")).eval()
    PEFT[case] = hf_logits(pm)
    PEFT[case + ":delta"] = maxdiff(PEFT[case], HF_BASE)  # how much the adapter moves the logits
    del pm
t_ref = time.time() - T0

rows_base = []
for bt in ["f32", "f16", "q8_0"]:
    lg, err = llama_logits(FIX / f"base_{bt}.gguf")
    rows_base.append((bt, err or f"{maxdiff(lg, HF_BASE):.2e}"))
    if bt == "f32" and (err or maxdiff(lg, HF_BASE) > F32_TOL):
        problems.append(f"llama.cpp base_f32.gguf vs transformers base: {err or maxdiff(lg, HF_BASE)} (harness broken?)")

# ------------------------------------------------------------------------------------------------
# 1. adapterkit merge -> llama.cpp (no adapter) vs unmerged PEFT
# ------------------------------------------------------------------------------------------------
EXPORT_REF = {}  # (case, base type) -> llama-export-lora output in the fixtures
for c in MANIFEST["cases"]:
    for e in c.get("exports", []):
        if e.get("path") and len(e["adapters"]) == 1 and e["adapters"][0]["scale"] == 1.0 \
                and e["adapters"][0]["path"].endswith("adapter_f32.gguf"):
            EXPORT_REF[(c["name"], e["base"].removeprefix("base_").removesuffix(".gguf"))] = e["path"]

merge_rows = []
for case in MERGE_CASES:
    for bt in (["f32", "f16", "q8_0"] if case == "plain" else ["f32"]):
        base = FIX / f"base_{bt}.gguf"
        m = WORK / f"m_{case}_{bt}.gguf"
        rc, text = run([AK, "merge", str(base), str(FIX / case / "adapter"), "-o", str(m)])
        row = {"case": case, "base": bt, "rc": rc,
               "n_notes": sum(1 for l in text.splitlines() if l.startswith("note:"))}
        if rc != 0:
            row["error"] = text.splitlines()[-1] if text else f"rc={rc}"
            problems.append(f"merge {case} base_{bt}: adapterkit failed: {row['error']}")
            merge_rows.append(row)
            continue
        check_mode(m)
        lg, err = llama_logits(m)
        if err:
            row["error"] = "llama.cpp: " + err
            problems.append(f"merge {case} base_{bt}: llama.cpp could not run adapterkit's output: {err}")
            merge_rows.append(row)
            continue
        row["logits"] = maxdiff(lg, PEFT[case])
        w, wn, types, issues = merged_tensor_check(m, base, case)
        row["tensor"], row["tensor_worst"], row["types"], row["issues"] = w, wn, types, issues
        ref = EXPORT_REF.get((case, bt))
        if ref:
            rlg, rerr = llama_logits(FIX / ref)
            row["export_lora"] = rerr or maxdiff(rlg, PEFT[case])
        for i in issues:
            problems.append(f"merge {case} base_{bt}: {i}")
        if bt == "f32":
            if row["logits"] > F32_TOL:
                problems.append(f"merge {case} base_f32: llama.cpp logits differ from unmerged PEFT by "
                                f"{row['logits']:.3e} (> {F32_TOL:g}); merged tensors vs PEFT merge_and_unload: "
                                f"{w:.3e} (worst {wn})")
            row["verdict"] = "PASS" if row["logits"] <= F32_TOL and not issues else "FAIL"
        else:
            # quantized/half bases: the base itself is rounded, so compare with llama.cpp's own export-lora
            ex = row.get("export_lora")
            ok = isinstance(ex, float) and row["logits"] <= 2 * ex + 1e-4
            row["verdict"] = ("PASS" if ok and not issues else "FAIL") if isinstance(ex, float) else "info"
            if isinstance(ex, float) and not ok:
                problems.append(f"merge {case} base_{bt}: logits vs PEFT {row['logits']:.3e}, worse than "
                                f"llama-export-lora's {ex:.3e}")
        merge_rows.append(row)

# ------------------------------------------------------------------------------------------------
# 2. adapterkit convert -> llama.cpp runtime LoRA vs unmerged PEFT; and llama.cpp's own converter
# ------------------------------------------------------------------------------------------------
conv_rows = []
for case in CONVERT_CASES + EXTRA_CONVERT_CASES:
    extra = case in EXTRA_CONVERT_CASES
    a = WORK / f"a_{case}.gguf"
    rc, text = run([AK, "convert", str(FIX / case / "adapter"), "--to", "gguf", "--base", str(FIX / "base_hf"),
                    "-o", str(a)])
    row = {"case": case, "extra": extra, "rc": rc,
           "msg": " | ".join(l for l in text.splitlines() if not l.startswith("converted "))}
    if rc != 0:
        row["error"] = text.splitlines()[-1] if text else f"rc={rc}"
        if not extra:
            problems.append(f"convert {case}: adapterkit failed: {row['error']}")
    else:
        check_mode(a)
        kv, ts, _ = read_gguf(a)
        row["alpha"] = kv.get("adapter.lora.alpha")
        row["n_tensors"] = len(ts)
        lg, err = llama_logits(FIX / "base_f32.gguf", [(a, 1.0)])
        if err:
            row["error"] = "llama.cpp: " + err
            problems.append(f"convert {case}: llama.cpp could not load adapterkit's LoRA: {err}")
        else:
            row["logits"] = maxdiff(lg, PEFT[case])
            if row["logits"] > F32_TOL:
                problems.append(f"convert {case}: llama.cpp base_f32 + runtime LoRA (adapterkit) differs from "
                                f"unmerged PEFT by {row['logits']:.3e} (> {F32_TOL:g})"
                                + (" -- adapterkit wrote a GGUF LoRA for an adapter llama.cpp cannot represent"
                                   if extra else ""))
    ref = FIX / case / "adapter_f32.gguf"
    if ref.exists():
        lg, err = llama_logits(FIX / "base_f32.gguf", [(ref, 1.0)])
        row["llamacpp_conv"] = err or maxdiff(lg, PEFT[case])
    else:
        conv = next((x for c in MANIFEST["cases"] if c["name"] == case for x in c.get("conversions", [])
                     if x["outtype"] == "f32"), None)
        row["llamacpp_conv"] = "refused: " + (conv["error"].split(": ")[-1] if conv and conv.get("error") else "?")
    if "logits" in row:
        row["verdict"] = "PASS" if row["logits"] <= F32_TOL else "FAIL"
    elif extra and rc != 0:
        row["verdict"] = "refused"
    else:
        row["verdict"] = "FAIL"
    conv_rows.append(row)

# ------------------------------------------------------------------------------------------------
# 3 (extra). adapterkit merge base_f32.gguf <GGUF LoRA> vs llama.cpp runtime LoRA with the same file
# ------------------------------------------------------------------------------------------------
gl_rows = []
for case in CONVERT_CASES:
    for label, lora in [("adapterkit a.gguf", WORK / f"a_{case}.gguf"), ("llama.cpp adapter_f32", FIX / case / "adapter_f32.gguf")]:
        if not lora.exists():
            continue
        m = WORK / f"mg_{case}_{label[:3]}.gguf"
        rc, text = run([AK, "merge", str(FIX / "base_f32.gguf"), str(lora), "-o", str(m)])
        row = {"case": case, "lora": label}
        if rc != 0:
            row["error"] = text.splitlines()[-1] if text else f"rc={rc}"
            problems.append(f"merge {case} base_f32 + GGUF LoRA ({label}): adapterkit failed: {row['error']}")
            gl_rows.append(row)
            continue
        lg, err = llama_logits(m)
        rt, err2 = llama_logits(FIX / "base_f32.gguf", [(lora, 1.0)])
        if err or err2:
            row["error"] = err or err2
            problems.append(f"merge {case} base_f32 + GGUF LoRA ({label}): {row['error']}")
        else:
            row["vs_runtime"] = maxdiff(lg, rt)
            row["vs_peft"] = maxdiff(lg, PEFT[case])
            if row["vs_runtime"] > F32_TOL:
                problems.append(f"merge {case} base_f32 + GGUF LoRA ({label}): merged logits differ from llama.cpp's "
                                f"runtime LoRA with the same file by {row['vs_runtime']:.3e}")
        gl_rows.append(row)

# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def f(x):
    return f"{x:.2e}" if isinstance(x, float) else ("-" if x is None else str(x))


L = []
now = datetime.datetime.now().astimezone()
L.append(f"GGUF files written by adapterkit, run in llama.cpp (libllama) -- {now.isoformat(timespec='seconds')}")
L.append("script: scripts/gguf-llamacpp-check.sh (+ scripts/gguf_llamacpp_check.py)")
L.append("")
L.append("versions")
for line in args.meta.splitlines():
    if line.strip():
        L.append(f"  {line}")
L.append(f"  llama.cpp: {MANIFEST['versions']['llama_cpp']} (build at {args.llama_cpp}; the fixtures' generator's build)")
L.append(f"  gguf-py {MANIFEST['versions'].get('gguf_py')}, peft {peft.__version__}, "
         f"transformers {transformers.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
         f"python {platform.python_version()}")
L.append(f"  runtime: lora_logits.cpp -> libllama, CPU, 1 thread, n_ctx 64, KV cache F32/F32, flash attention off")
L.append(f"  prompt tokens (fixtures/gguf/manifest.json base_runtime_check.tokens): {TOKENS}; metric = max |logit diff| "
         f"over all {len(TOKENS)}x{VOCAB} logits")
L.append(f"  reference = transformers LlamaForCausalLM(fixtures/gguf/base_hf, f32) + PeftModel.from_pretrained(<case>/adapter), "
         f"UNMERGED forward")
L.append("")
L.append("0. harness sanity: llama.cpp base_<T>.gguf (no adapter) vs transformers base")
for bt, d in rows_base:
    L.append(f"   base_{bt:<5} {d}")
L.append("   how far each adapter moves the logits (PEFT unmerged vs base), i.e. the size of what is being checked:")
L.append("   " + ", ".join(f"{c} {PEFT[c + ':delta']:.2f}" for c in MERGE_CASES))
L.append("")
L.append("1. adapterkit merge base_<T>.gguf <case>/adapter -o m.gguf ; llama.cpp m.gguf vs unmerged PEFT")
L.append("   logits      = llama.cpp(m.gguf) vs PEFT unmerged forward")
L.append("   export-lora = llama.cpp(fixture llama-export-lora merge of the llama.cpp-converted adapter_f32.gguf) vs PEFT, "
         "for comparison")
L.append("   tensors     = merged tensors in m.gguf (q/k un-permuted) vs PEFT merge_and_unload (<case>/merged_peft.safetensors)")
hdr = f"   {'case':<11}{'base':<6}{'verdict':<8}{'logits':>10}{'export-lora':>13}{'tensors':>10}  merged tensor types / issues"
L.append(hdr)
L.append("   " + "-" * (len(hdr) - 3))
for r in merge_rows:
    if "error" in r:
        L.append(f"   {r['case']:<11}{r['base']:<6}{'FAIL':<8}  {r['error']}")
        continue
    types = ",".join(f"{k}x{v}" for k, v in sorted(r["types"].items()))
    if r["n_notes"]:
        types += f" ({r['n_notes']} 'note:' lines from adapterkit)"
    extra = ("; " + "; ".join(r["issues"])) if r["issues"] else ""
    L.append(f"   {r['case']:<11}{r['base']:<6}{r['verdict']:<8}{f(r['logits']):>10}{f(r.get('export_lora')):>13}"
             f"{f(r['tensor']):>10}  {types}{extra}")
L.append("")
L.append("2. adapterkit convert <case>/adapter --to gguf --base base_hf -o a.gguf ; llama.cpp base_f32.gguf + runtime "
         "LoRA a.gguf (scale 1) vs unmerged PEFT")
L.append("   adapterkit = with adapterkit's a.gguf ; llama.cpp-conv = with the fixture's <case>/adapter_f32.gguf "
         "(convert_lora_to_gguf.py)")
hdr = f"   {'case':<11}{'verdict':<9}{'adapterkit':>11}{'llama.cpp-conv':>16}  {'alpha':<6}  adapterkit's message"
L.append(hdr)
L.append("   " + "-" * (len(hdr) - 3))
for r in conv_rows:
    tag = r["case"] + ("*" if r["extra"] else "")
    ak = f(r.get("logits")) if "logits" in r else ("refused" if r["rc"] != 0 else "error")
    msg = r.get("error") if r["rc"] != 0 else r["msg"]
    lc = r.get("llamacpp_conv")
    lc = "refused" if isinstance(lc, str) and lc.startswith("refused") else f(lc)
    al = f"{r['alpha']:g}" if isinstance(r.get("alpha"), float) else "-"
    L.append(f"   {tag:<11}{r['verdict']:<9}{ak:>11}{lc:>16}  {al:<6}  {msg or ''}")
L.append("   * not asked for: adapters llama.cpp cannot represent (lora_B bias, DoRA magnitude); 'refused' is the right "
         "answer (convert_lora_to_gguf.py refuses them too)")
L.append("")
L.append("3. (extra) adapterkit merge base_f32.gguf <GGUF LoRA> -o m.gguf ; llama.cpp m.gguf vs llama.cpp base_f32 + the "
         "same LoRA at runtime")
L.append("   (a GGUF LoRA is read with llama.cpp's semantics: scale = adapter.lora.alpha / rank of lora_b)")
hdr = f"   {'case':<11}{'GGUF LoRA':<23}{'vs runtime':>11}{'vs PEFT':>10}"
L.append(hdr)
L.append("   " + "-" * (len(hdr) - 3))
for r in gl_rows:
    if "error" in r:
        L.append(f"   {r['case']:<11}{r['lora']:<23}  FAIL {r['error']}")
    else:
        L.append(f"   {r['case']:<11}{r['lora']:<23}{f(r['vs_runtime']):>11}{f(r['vs_peft']):>10}")
L.append("")
if notes:
    L.append("notes")
    for n in notes:
        L.append(f"  - {n}")
    L.append("")
L.append(f"RESULT: {'FAIL' if problems else 'PASS'} ({len(problems)} problem(s)); tolerance for f32 rows {F32_TOL:g}; "
         f"f16/q8_0 rows must be within 2x+1e-4 of llama-export-lora's error")
for p in problems:
    L.append(f"  - {p}")
if warns:
    L.append("warnings (outputs load and compute right, but):")
    for w in warns:
        L.append(f"  - {w}")
L.append(f"wall time of the checks: {time.time() - T0:.1f} s (of which PEFT references {t_ref:.1f} s)")

text = "\n".join(L) + "\n"
print(text, end="")
Path(args.out).write_text(text)
print(f"written to {args.out}")
sys.exit(1 if problems else 0)

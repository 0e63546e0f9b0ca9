#!/usr/bin/env python3
"""Write a "fine-tuned" copy of a BF16 Llama checkpoint whose projection deltas are nearly low-rank.

Usage:
    python3 bench/gen_finetune.py [BASE_DIR] [OUT_DIR] [--rank R] [--seed S]
                                  [--delta-min F] [--delta-max F] [--noise F] [--norm-std F]
                                  [--untouched F]

Defaults: BASE_DIR /tmp/adapterkit-bench/base (written by gen_tinyllama.py), OUT_DIR
/tmp/adapterkit-bench/finetuned, rank 48, seed 0.

OUT_DIR gets the same files as BASE_DIR: the same shard names, the same safetensors headers
(byte for byte: same tensor order, dtypes, shapes and offsets), the same
model.safetensors.index.json, config.json and generation_config.json (copied verbatim), plus
GENERATED.json, written last; its presence means the output is complete.

What changes, tensor by tensor (W is the base tensor, decoded from BF16 to float32):

- every 2-D projection of the decoder layers (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj):
      W' = bf16_rne(W + dW + N),   dW = B @ A,  B (out, R), A (R, in), both N(0, 1) in float64,
  with dW scaled so ||dW||_F = f * ||W||_F, f drawn uniformly from [delta-min, delta-max]
  (default 1%..3%) per tensor, and N dense N(0, 1) noise scaled so ||N||_F = noise * ||W||_F
  (default 0.1%). So the true delta has rank R (48) plus a small full-rank part, as a real
  fine-tune has. Rounding W' to BF16 adds another full-rank error of about 0.1% of ||W||_F
  (BF16 keeps 8 significant bits), so the stored delta W' - W is not exactly rank R + noise;
  bench/check_extract.py measures the optimal rank-r error on the stored delta itself.
- RMSNorm weights (input_layernorm, post_attention_layernorm, model.norm): W' = bf16_rne(W +
  norm-std * N(0, 1)) (default std 0.02, about 2.5 BF16 ulps at 1.0).
- everything else (model.embed_tokens, lm_head, and any tensor not matched above): copied bit for
  bit.
- with --untouched F > 0, each projection is instead copied bit for bit with probability F (as
  if that module had been frozen during fine-tuning). The draw comes from a separate stream,
  seeded by (seed, crc32 of the name, 1), so the perturbed projections are the same as with
  --untouched 0, and different seeds leave different projections untouched. The default 0
  draws nothing and gives the same output as before the option existed.
  bench/merge_vs_mergekit.sh writes its three TIES inputs with --seed 1/2/3 --noise 0.005
  --untouched 0.1.

bf16_rne is round-to-nearest-even from float32. Each tensor has its own random stream, seeded by
(seed, crc32 of its name), so the output is the same for the same arguments and base; the only
floating-point reduction is the float64 B @ A (BLAS), whose last-bit differences across BLAS
builds vanish when the result is rounded to float32 and then to BF16, except in vanishingly rare
ties.

Only python3 + numpy are needed. One tensor is in memory at a time (the largest, 5632 x 2048, needs
about 0.4 GB of temporaries), so the 1.1B-parameter model needs well under 1 GB of RAM.
"""

import argparse
import json
import os
import re
import shutil
import struct
import sys
import time
import zlib

import numpy as np

DEFAULT_WORKDIR = "/tmp/adapterkit-bench"
PROJ_RE = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
NORM_RE = re.compile(r"^model\.(layers\.\d+\.(input_layernorm|post_attention_layernorm)|norm)\.weight$")
COPY_CHUNK = 64 * 1024 * 1024
# Files of the model directory that are copied verbatim (when the base has them).
COPIED_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json"]


def read_header(path):
    """(raw header bytes including the 8-byte length, parsed header dict, data start offset)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    return struct.pack("<Q", n) + raw, json.loads(raw), 8 + n


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_rne(x):
    """Round float32 to BF16 bit patterns, round-to-nearest-even (finite inputs only)."""
    if not np.all(np.isfinite(x)):
        raise ValueError("non-finite value in a generated tensor")
    bits = x.astype(np.float32, copy=False).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    return rounded.astype("<u2")


def tensor_rng(seed, name):
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def untouched_rng(seed, name):
    """The stream that decides --untouched; separate from tensor_rng so the perturbations don't move."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), 1])


def perturb_projection(w, rng, rank, delta_min, delta_max, noise):
    """W (out, in) float32 -> (W + dW + N as float32, stats)."""
    out_f, in_f = w.shape
    w_norm = float(np.linalg.norm(w.astype(np.float64)))
    frac = float(rng.uniform(delta_min, delta_max))
    b = rng.standard_normal((out_f, rank))
    a = rng.standard_normal((rank, in_f))
    dw = b @ a  # float64
    dw *= frac * w_norm / np.linalg.norm(dw)
    n = rng.standard_normal((out_f, in_f), dtype=np.float32)
    n *= np.float32(noise * w_norm / float(np.linalg.norm(n.astype(np.float64))))
    res = dw.astype(np.float32)
    del dw
    res += n
    del n
    res += w
    return res, frac


def copy_bytes(fin, fout, nbytes):
    left = nbytes
    while left > 0:
        buf = fin.read(min(left, COPY_CHUNK))
        if not buf:
            raise IOError("unexpected end of file")
        fout.write(buf)
        left -= len(buf)


def process_shard(src, dst, args, stats):
    raw_header, header, data_start = read_header(src)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][0])
    tmp = dst + ".partial"
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        fout.write(raw_header)
        pos = 0
        for name, info in entries:
            start, end = info["data_offsets"]
            if start != pos:
                raise ValueError(f"{src}: tensor data of {name} is not contiguous")
            nbytes = end - start
            fin.seek(data_start + start)
            shape = tuple(info["shape"])
            is_proj = PROJ_RE.match(name) and len(shape) == 2
            if is_proj and args.untouched > 0 and untouched_rng(args.seed, name).random() < args.untouched:
                is_proj = False
                stats["untouched"] += 1
            is_norm = NORM_RE.match(name) and len(shape) == 1
            if (is_proj or is_norm) and info["dtype"] != "BF16":
                raise ValueError(f"{name} is {info['dtype']}; only BF16 checkpoints are supported")
            if is_proj or is_norm:
                u16 = np.frombuffer(fin.read(nbytes), dtype="<u2").reshape(shape)
                w = bf16_to_f32(u16)
                rng = tensor_rng(args.seed, name)
                if is_proj:
                    new, frac = perturb_projection(w, rng, args.rank, args.delta_min,
                                                   args.delta_max, args.noise)
                    stats["proj"] += 1
                    stats["fracs"].append(frac)
                else:
                    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(args.norm_std)
                    new = w + noise
                    stats["norm"] += 1
                out = f32_to_bf16_rne(new)
                if is_proj:
                    d = bf16_to_f32(out).astype(np.float64) - w.astype(np.float64)
                    stats["rel_delta"].append(float(np.linalg.norm(d) / np.linalg.norm(w)))
                fout.write(memoryview(out).cast("B"))
            else:
                copy_bytes(fin, fout, nbytes)
                if not (PROJ_RE.match(name) and len(shape) == 2):
                    stats["copied"] += 1
            pos = end
    os.replace(tmp, dst)
    return len(entries)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", nargs="?", default=os.path.join(DEFAULT_WORKDIR, "base"),
                    help="base checkpoint directory (default /tmp/adapterkit-bench/base)")
    ap.add_argument("out", nargs="?", default=os.path.join(DEFAULT_WORKDIR, "finetuned"),
                    help="output directory (default /tmp/adapterkit-bench/finetuned)")
    ap.add_argument("--rank", type=int, default=48, help="true rank of each projection delta (48)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    ap.add_argument("--delta-min", type=float, default=0.01,
                    help="smallest ||dW||/||W|| of the low-rank part (default 0.01)")
    ap.add_argument("--delta-max", type=float, default=0.03,
                    help="largest ||dW||/||W|| of the low-rank part (default 0.03)")
    ap.add_argument("--noise", type=float, default=0.001,
                    help="||N||/||W|| of the dense noise added to each projection (default 0.001)")
    ap.add_argument("--norm-std", type=float, default=0.02,
                    help="std of the additive perturbation of RMSNorm weights (default 0.02)")
    ap.add_argument("--untouched", type=float, default=0.0,
                    help="probability that a projection is left bit-identical to the base "
                         "(default 0: every projection is perturbed)")
    args = ap.parse_args(argv)
    if args.rank < 1:
        ap.error("--rank must be >= 1")
    if not 0 <= args.delta_min <= args.delta_max:
        ap.error("need 0 <= --delta-min <= --delta-max")
    if not 0 <= args.untouched <= 1:
        ap.error("--untouched must be in [0, 1]")

    t0 = time.monotonic()
    base = os.path.abspath(args.base)
    out = os.path.abspath(args.out)
    if base == out:
        ap.error("the output directory must differ from the base")
    index_path = os.path.join(base, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(base, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        sys.exit(f"gen_finetune: {base} has neither model.safetensors.index.json nor model.safetensors")

    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, "GENERATED.json")
    if os.path.exists(marker):
        os.remove(marker)
    # Remove stale shards of a previous run against a base with another layout.
    for f in os.listdir(out):
        if f.endswith(".safetensors") and f not in shards:
            os.remove(os.path.join(out, f))

    stats = {"proj": 0, "norm": 0, "copied": 0, "untouched": 0, "fracs": [], "rel_delta": []}
    n_tensors = 0
    for shard in shards:
        ts = time.monotonic()
        n = process_shard(os.path.join(base, shard), os.path.join(out, shard), args, stats)
        n_tensors += n
        print(f"  {shard}: {n} tensors ({time.monotonic() - ts:.1f}s)", file=sys.stderr)
    for fname in COPIED_FILES:
        if os.path.exists(os.path.join(base, fname)):
            shutil.copyfile(os.path.join(base, fname), os.path.join(out, fname))

    elapsed = time.monotonic() - t0
    rd = stats["rel_delta"]
    info = {
        "base": base,
        "rank": args.rank,
        "seed": args.seed,
        "delta_min": args.delta_min,
        "delta_max": args.delta_max,
        "noise": args.noise,
        "norm_std": args.norm_std,
        "untouched": args.untouched,
        "tensors": n_tensors,
        "projections_perturbed": stats["proj"],
        "norms_perturbed": stats["norm"],
        "copied_bit_identical": stats["copied"],
        "projections_untouched": stats["untouched"],
        "stored_rel_delta_min": round(min(rd), 5) if rd else None,
        "stored_rel_delta_max": round(max(rd), 5) if rd else None,
        "seconds": round(elapsed, 1),
    }
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    untouched = f", {stats['untouched']} projections untouched" if args.untouched > 0 else ""
    print(f"wrote {out}: {stats['proj']} projections + rank-{args.rank} delta, {stats['norm']} norms "
          f"perturbed, {stats['copied']} tensors copied{untouched}; stored ||W'-W||/||W|| "
          f"{info['stored_rel_delta_min']}..{info['stored_rel_delta_max']} ({elapsed:.1f}s)",
          file=sys.stderr)


if __name__ == "__main__":
    main()

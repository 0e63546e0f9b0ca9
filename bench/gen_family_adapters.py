#!/usr/bin/env python3
"""Generate one random PEFT adapter per PEFT family for a generated TinyLlama-shaped base.

Usage:
    python3 bench/gen_family_adapters.py BASE_DIR OUT_DIR [--families dora,ia3,...|all] [--seed S]

BASE_DIR is a checkpoint written by bench/gen_tinyllama.py (its config.json gives the layer count
and the shapes, and its model.safetensors.index.json is checked for every targeted weight).
For every family F this writes OUT_DIR/F/adapter_config.json, OUT_DIR/F/adapter_model.safetensors
(F32, keys `base_model.model.<module>.<param>`) and, last, OUT_DIR/F/GENERATED.json.

Every adapter targets all seven projections (q, k, v, o, gate, up, down) of every layer. Key
names, shapes and adapter_config.json fields follow what PEFT 0.21.2 writes (checked against the
golden fixtures in fixtures/peft_families/ and fixtures/peft/llama_dora/):

  family     hyper-parameters                          tensors per module
  dora       r 16, lora_alpha 32, use_dora             lora_A.weight [r,in], lora_B.weight [out,r],
                                                       lora_magnitude_vector [out]
  ia3        feedforward_modules [down_proj]           ia3_l [out,1] (ff: [1,in])
  loha       r 16, alpha 16                            hada_w{1,2}_a [out,r], hada_w{1,2}_b [r,in]
  lokr       r 16, alpha 16, decompose_factor -1       lokr_w1 [a,c] + lokr_w2_a [b,r], lokr_w2_b [r,d]
                                                       (lokr_w2 [b,d] where PEFT keeps it full)
  oft        oft_block_size 32, r 0, Cayley-Neumann 5  oft_R.weight [in/32, 32*31/2]
  boft       boft_block_size 8, butterfly factor 1     boft_R [1, in/8, 8, 8], boft_s [out,1]
  hra        r 8, apply_GS false                       hra_u [in, r]
  vera       r 256, save_projection                    vera_lambda_b [out], vera_lambda_d [r];
                                                       shared base_model.vera_A [r, max_in],
                                                       base_model.vera_B [max_out, r]
  fourierft  n_frequency 1000, scaling 150, seed 777   fourierft_spectrum [n]

Values are random and non-identity ("trained"), sized so that the merged change of a projection
is visible at BF16 resolution (roughly 1e-4..1e-2 per element, on base weights of std 0.02) while
every merged value stays finite:
  dora:      lora_A ~ U(+-1/sqrt(in)), lora_B ~ N(0, 0.02) (as gen_tinyllama.py's LoRA);
             magnitude = expected row norm of W + (alpha/r)*B@A, times 1 + 0.01*randn
  ia3:       1 + 0.02*randn
  loha:      all four factors N(0, 0.1)  -> delta std ~ 16 * 0.1^4 = 1.6e-3
  lokr:      lokr_w1 N(0, 0.05), lokr_w2_a/b N(0, 0.1) -> delta std ~ 2e-3
  oft:       oft_R N(0, 0.01)
  boft:      boft_R N(0, 0.01), boft_s 1 + 0.01*randn
  hra:       hra_u N(0, 0.01) (normalised by the merge, so each u is a full Householder reflection)
  vera:      vera_A / vera_B kaiming-uniform as PEFT initialises them, lambda_d 0.1 + 0.02*randn,
             lambda_b 2*randn
  fourierft: spectrum N(0, 1) (PEFT's init_weights=False)

Only python3 + numpy are needed (no torch). The output is the same for the same arguments; each
family has its own random stream, so generating a subset gives the same files.
"""

import argparse
import json
import os
import struct
import sys
import time

import numpy as np

FAMILIES = ["dora", "ia3", "loha", "lokr", "oft", "boft", "hra", "vera", "fourierft"]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"

# Hyper-parameters.
LORA_R, LORA_ALPHA = 16, 32          # DoRA (same as gen_tinyllama.py's LoRA)
LYCO_R, LYCO_ALPHA = 16, 16          # LoHa, LoKr
OFT_BLOCK = 32
BOFT_BLOCK = 8
HRA_R = 8
VERA_R = 256
FOURIER_N, FOURIER_SCALING, FOURIER_SEED = 1000, 150.0, 777


# ------------------------------------------------------------------------------------ the base


def load_base(base_dir):
    """(num_layers, [(module path, (out, in))]) from the base's config.json, checked against its index."""
    with open(os.path.join(base_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    hidden = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    layers = cfg["num_hidden_layers"]
    shapes = {
        "q_proj": ("self_attn", (heads * head_dim, hidden)),
        "k_proj": ("self_attn", (kv_heads * head_dim, hidden)),
        "v_proj": ("self_attn", (kv_heads * head_dim, hidden)),
        "o_proj": ("self_attn", (hidden, heads * head_dim)),
        "gate_proj": ("mlp", (inter, hidden)),
        "up_proj": ("mlp", (inter, hidden)),
        "down_proj": ("mlp", (hidden, inter)),
    }
    modules = []
    for i in range(layers):
        for name in TARGET_MODULES:
            parent, shape = shapes[name]
            modules.append((f"model.layers.{i}.{parent}.{name}", shape))

    # Every targeted weight must exist in the base, with the expected shape.
    index_path = os.path.join(base_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    header = {}
    for fname in files:
        header.update(read_header(os.path.join(base_dir, fname)))
    for mod, (out_f, in_f) in modules:
        t = header.get(mod + ".weight")
        if t is None:
            sys.exit(f"gen_family_adapters.py: {mod}.weight is not in {base_dir}")
        if list(t["shape"]) != [out_f, in_f]:
            sys.exit(f"gen_family_adapters.py: {mod}.weight is {t['shape']}, expected {[out_f, in_f]}")
    return layers, modules


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


# ------------------------------------------------------------------------------------ writing


def write_safetensors(path, tensors):
    """tensors: list of (name, shape, fn) with fn() -> float32 array of that shape, called in order.

    Keys are sorted, as safetensors' save_file (PEFT) writes them.
    """
    tensors = sorted(tensors, key=lambda t: t[0])
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _fn in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        written = 0
        for name, shape, fn in tensors:
            x = np.ascontiguousarray(fn(), dtype="<f4")
            assert x.shape == tuple(shape), (name, x.shape, shape)
            assert np.isfinite(x).all(), name
            f.write(memoryview(x).cast("B"))
            written += x.nbytes
    assert written == offset, (written, offset)
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ------------------------------------------------------------------------------------ helpers


def normal(rng, shape, std, mean=0.0):
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= np.float32(std)
    if mean:
        x += np.float32(mean)
    return x


def uniform(rng, shape, bound):
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def factorization(dimension, factor=-1):
    """peft/tuners/lokr/layer.py factorization(), verbatim."""
    if factor > 0 and (dimension % factor) == 0:
        m = factor
        n = dimension // factor
        if m > n:
            n, m = m, n
        return m, n
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def key(mod, param):
    return f"{PREFIX}{mod}.{param}"


# ------------------------------------------------------------------------------------ families
# Each returns (tensor list for write_safetensors, adapter_config.json dict without the common
# fields). The tensor functions close over rng and are called in sorted key order, so the
# values are deterministic for a given seed.


def fam_dora(rng, modules):
    tensors = []
    scale = LORA_ALPHA / LORA_R
    for mod, (out_f, in_f) in modules:
        bound = 1.0 / np.sqrt(in_f)
        # Expected row norm of W + scale*B@A: W ~ N(0, 0.02), A ~ U(+-bound) (var bound^2/3),
        # B ~ N(0, 0.02), r terms.
        row_norm = np.sqrt(in_f * (0.02 ** 2 + LORA_R * (scale * 0.02) ** 2 * bound ** 2 / 3))
        tensors += [
            (key(mod, "lora_A.weight"), (LORA_R, in_f), lambda i=in_f, b=bound: uniform(rng, (LORA_R, i), b)),
            (key(mod, "lora_B.weight"), (out_f, LORA_R), lambda o=out_f: normal(rng, (o, LORA_R), 0.02)),
            (key(mod, "lora_magnitude_vector"), (out_f,),
             lambda o=out_f, n=row_norm: normal(rng, (o,), 0.01, 1.0) * np.float32(n)),
        ]
    cfg = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": LORA_ALPHA, "lora_bias": False, "lora_dropout": 0.05,
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16,
        "r": LORA_R, "rank_pattern": {}, "revision": None, "target_parameters": None,
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": True, "use_qalora": False,
        "use_rslora": False, "velora_config": None,
    }
    return tensors, cfg


def fam_ia3(rng, modules):
    ff = ["down_proj"]
    tensors = []
    for mod, (out_f, in_f) in modules:
        is_ff = any(mod.endswith(t) for t in ff)
        shape = (1, in_f) if is_ff else (out_f, 1)
        tensors.append((key(mod, "ia3_l"), shape, lambda s=shape: normal(rng, s, 0.02, 1.0)))
    cfg = {
        "auto_mapping": None, "exclude_modules": None, "fan_in_fan_out": False, "feedforward_modules": ff,
        "inference_mode": True, "init_ia3_weights": True, "modules_to_save": None, "peft_type": "IA3",
        "revision": None,
    }
    return tensors, cfg


def lyco_common():
    return {
        "alpha": LYCO_ALPHA, "alpha_pattern": {}, "auto_mapping": None, "exclude_modules": None,
        "inference_mode": True, "init_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "module_dropout": 0.0, "modules_to_save": None, "r": LYCO_R, "rank_dropout": 0.0, "rank_pattern": {},
        "revision": None, "use_effective_conv2d": False,
    }


def fam_loha(rng, modules):
    r = LYCO_R
    tensors = []
    for mod, (out_f, in_f) in modules:
        for w in ("hada_w1", "hada_w2"):
            tensors.append((key(mod, w + "_a"), (out_f, r), lambda o=out_f: normal(rng, (o, r), 0.1)))
            tensors.append((key(mod, w + "_b"), (r, in_f), lambda i=in_f: normal(rng, (r, i), 0.1)))
    cfg = dict(lyco_common(), peft_type="LOHA")
    return tensors, cfg


def fam_lokr(rng, modules):
    r, factor, decompose_both = LYCO_R, -1, False
    tensors = []
    for mod, (out_f, in_f) in modules:
        # LoKrLayer.update_layer: shape = ((out_l, out_k), (in_m, in_n)).
        out_l, out_k = factorization(out_f, factor)
        in_m, in_n = factorization(in_f, factor)
        use_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
        use_w2 = r >= max(out_k, in_n) / 2
        assert use_w1
        tensors.append((key(mod, "lokr_w1"), (out_l, in_m),
                        lambda s=(out_l, in_m): normal(rng, s, 0.05)))
        if use_w2:
            tensors.append((key(mod, "lokr_w2"), (out_k, in_n),
                            lambda s=(out_k, in_n): normal(rng, s, 0.1 * 0.1 * np.sqrt(r))))
        else:
            tensors.append((key(mod, "lokr_w2_a"), (out_k, r), lambda s=(out_k, r): normal(rng, s, 0.1)))
            tensors.append((key(mod, "lokr_w2_b"), (r, in_n), lambda s=(r, in_n): normal(rng, s, 0.1)))
    cfg = dict(lyco_common(), peft_type="LOKR", decompose_both=decompose_both, decompose_factor=factor,
               rank_dropout_scale=False)
    return tensors, cfg


def fam_oft(rng, modules):
    bs = OFT_BLOCK
    n_params = bs * (bs - 1) // 2
    tensors = []
    for mod, (_out_f, in_f) in modules:
        if in_f % bs:
            sys.exit(f"gen_family_adapters.py: OFT block size {bs} does not divide in_features {in_f} of {mod}")
        shape = (in_f // bs, n_params)
        tensors.append((key(mod, "oft_R.weight"), shape, lambda s=shape: normal(rng, s, 0.01)))
    cfg = {
        "auto_mapping": None, "bias": "none", "block_share": False, "coft": False, "eps": 6e-05,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True, "init_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "module_dropout": 0.0, "modules_to_save": None,
        "num_cayley_neumann_terms": 5, "oft_block_size": bs, "peft_type": "OFT", "r": 0, "revision": None,
        "use_cayley_neumann": True,
    }
    return tensors, cfg


def fam_boft(rng, modules):
    bs, factor = BOFT_BLOCK, 1
    tensors = []
    for mod, (out_f, in_f) in modules:
        if in_f % bs:
            sys.exit(f"gen_family_adapters.py: BOFT block size {bs} does not divide in_features {in_f} of {mod}")
        shape = (factor, in_f // bs, bs, bs)
        tensors.append((key(mod, "boft_R"), shape, lambda s=shape: normal(rng, s, 0.01)))
        tensors.append((key(mod, "boft_s"), (out_f, 1), lambda o=out_f: normal(rng, (o, 1), 0.01, 1.0)))
    cfg = {
        "auto_mapping": None, "bias": "none", "boft_block_num": 0, "boft_block_size": bs, "boft_dropout": 0.0,
        "boft_n_butterfly_factor": factor, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "modules_to_save": None, "peft_type": "BOFT", "revision": None,
    }
    return tensors, cfg


def fam_hra(rng, modules):
    r = HRA_R
    tensors = []
    for mod, (_out_f, in_f) in modules:
        tensors.append((key(mod, "hra_u"), (in_f, r), lambda i=in_f: normal(rng, (i, r), 0.01)))
    cfg = {
        "apply_GS": False, "auto_mapping": None, "bias": "none", "exclude_modules": None, "inference_mode": True,
        "init_weights": True, "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None,
        "peft_type": "HRA", "r": r, "revision": None,
    }
    return tensors, cfg


def fam_vera(rng, modules):
    r = VERA_R
    max_out = max(o for _m, (o, _i) in modules)
    max_in = max(i for _m, (_o, i) in modules)
    # torch.nn.init.kaiming_uniform_(t, a=sqrt(5)): bound = 1/sqrt(fan_in), fan_in = t.shape[1].
    tensors = [
        ("base_model.vera_A", (r, max_in), lambda: uniform(rng, (r, max_in), 1.0 / np.sqrt(max_in))),
        ("base_model.vera_B", (max_out, r), lambda: uniform(rng, (max_out, r), 1.0 / np.sqrt(r))),
    ]
    for mod, (out_f, _in_f) in modules:
        tensors.append((key(mod, "vera_lambda_b"), (out_f,), lambda o=out_f: normal(rng, (o,), 2.0)))
        tensors.append((key(mod, "vera_lambda_d"), (r,), lambda: normal(rng, (r,), 0.02, 0.1)))
    cfg = {
        "auto_mapping": None, "bias": "none", "d_initial": 0.1, "fan_in_fan_out": False, "inference_mode": True,
        "init_weights": True, "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None,
        "peft_type": "VERA", "projection_prng_key": 0, "r": r, "revision": None, "save_projection": True,
        "vera_dropout": 0.0,
    }
    return tensors, cfg


def fam_fourierft(rng, modules):
    n = FOURIER_N
    tensors = [(key(mod, "fourierft_spectrum"), (n,), lambda: normal(rng, (n,), 1.0)) for mod, _s in modules]
    cfg = {
        "auto_mapping": None, "bias": "none", "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_weights": False, "layers_pattern": None, "layers_to_transform": None,
        "modules_to_save": None, "n_frequency": n, "n_frequency_pattern": {}, "peft_type": "FOURIERFT",
        "random_loc_seed": FOURIER_SEED, "revision": None, "scaling": FOURIER_SCALING,
    }
    return tensors, cfg


GENERATORS = {name: globals()["fam_" + name] for name in FAMILIES}


# ------------------------------------------------------------------------------------ main


def human(nbytes):
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def generate(family, base_dir, out_dir, modules, seed):
    t0 = time.monotonic()
    fdir = os.path.join(out_dir, family)
    os.makedirs(fdir, exist_ok=True)
    marker = os.path.join(fdir, "GENERATED.json")
    if os.path.exists(marker):
        os.remove(marker)
    # One stream per family, independent of which other families are generated.
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    tensors, cfg = GENERATORS[family](rng, modules)
    size = write_safetensors(os.path.join(fdir, "adapter_model.safetensors"), tensors)
    cfg.update({
        "base_model_name_or_path": base_dir,
        "peft_version": PEFT_VERSION,
        "target_modules": list(TARGET_MODULES),
        "task_type": "CAUSAL_LM",
    })
    write_json(os.path.join(fdir, "adapter_config.json"), cfg)
    elapsed = time.monotonic() - t0
    write_json(marker, {
        "family": family, "peft_type": cfg["peft_type"], "base": base_dir, "seed": seed,
        "modules": len(modules), "tensors": len(tensors), "bytes": size, "seconds": round(elapsed, 2),
    })
    print(f"  {family:10s} {cfg['peft_type']:9s} {len(tensors):5d} tensors {human(size):>9s}"
          f"  ({elapsed:.1f}s)", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base_dir", help="base checkpoint written by bench/gen_tinyllama.py (WORKDIR/base)")
    ap.add_argument("out_dir", help="adapters are written to OUT_DIR/<family>/")
    ap.add_argument("--families", default="all",
                    help=f"comma- or space-separated subset of: {' '.join(FAMILIES)} (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    args = ap.parse_args(argv)

    fams = FAMILIES if args.families == "all" else args.families.replace(",", " ").split()
    unknown = [f for f in fams if f not in GENERATORS]
    if unknown:
        ap.error(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: {FAMILIES}")

    base_dir = os.path.abspath(args.base_dir)
    out_dir = os.path.abspath(args.out_dir)
    layers, modules = load_base(base_dir)
    print(f"generating {len(fams)} adapter(s) for {layers} layer(s) x {len(TARGET_MODULES)} projections "
          f"into {out_dir}", file=sys.stderr)
    for fam in fams:
        generate(fam, base_dir, out_dir, modules, args.seed)


if __name__ == "__main__":
    main()

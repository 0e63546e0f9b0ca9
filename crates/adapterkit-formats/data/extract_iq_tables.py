#!/usr/bin/env python3
"""Extract the i-quant lookup tables from ggml's ggml-common.h into iq_tables.bin.

Source: llama.cpp commit 0c1e570, ggml/src/ggml-common.h, sha256
0061131b615c5721fc88a78feeb22c1f8c450f1c2646a317d80796a653bf595c (the script refuses another
header unless --any-header is given).

Usage: extract_iq_tables.py PATH/TO/ggml-common.h [OUT.bin]

Output layout, every integer little-endian:
    magic  b"AKIQTAB1"
    u32    number of tables
    per table:
        u8     name length, then the ASCII name
        u8     element width in bytes (1, 4 or 8)
        u8     1 when the elements are signed, else 0
        u32    element count
        bytes  the elements, each `width` bytes little-endian (two's complement when signed)

A uint64 grid entry stored little-endian is exactly the 8 bytes ggml reads through its
`(const uint8_t *)(grid + i)` casts on a little-endian machine.
"""

import hashlib
import re
import struct
import sys

HEADER_SHA256 = "0061131b615c5721fc88a78feeb22c1f8c450f1c2646a317d80796a653bf595c"

# (name in the header, element width, signed)
TABLES = [
    ("kmask_iq2xs", 1, False),
    ("ksigns_iq2xs", 1, False),
    ("iq2xxs_grid", 8, False),
    ("iq2xs_grid", 8, False),
    ("iq2s_grid", 8, False),
    ("iq3xxs_grid", 4, False),
    ("iq3s_grid", 4, False),
    ("iq1s_grid", 8, False),
    ("kvalues_iq4nl", 1, True),
    ("kvalues_fp4", 1, True),
]

C_TYPES = {
    "uint8_t": (1, False),
    "int8_t": (1, True),
    "uint32_t": (4, False),
    "uint64_t": (8, False),
}


def resolve_size(text, size):
    """A table size: a literal or a #define'd name."""
    if size.isdigit():
        return int(size)
    m = re.search(r"^#define\s+%s\s+(\d+)\s*$" % re.escape(size), text, re.M)
    if not m:
        sys.exit(f"cannot resolve table size {size!r}")
    return int(m.group(1))


def extract(text, name, width, signed):
    pat = re.compile(
        r"GGML_TABLE_BEGIN\(\s*(\w+)\s*,\s*%s\s*,\s*(\w+)\s*\)(.*?)GGML_TABLE_END\(\)"
        % re.escape(name),
        re.S,
    )
    found = pat.findall(text)
    if len(found) != 1:
        sys.exit(f"{name}: expected one definition, found {len(found)}")
    ctype, size, body = found[0]
    if C_TYPES.get(ctype) != (width, signed):
        sys.exit(f"{name}: element type {ctype} is not the expected one")
    count = resolve_size(text, size)
    body = re.sub(r"//[^\n]*", "", body)
    values = [int(tok, 0) for tok in re.findall(r"-?(?:0x[0-9a-fA-F]+|\d+)", body)]
    if len(values) != count:
        sys.exit(f"{name}: {len(values)} values, declared {count}")
    lo, hi = (-(1 << (8 * width - 1)), 1 << (8 * width - 1)) if signed else (0, 1 << (8 * width))
    for v in values:
        if not lo <= v < hi:
            sys.exit(f"{name}: value {v} does not fit {ctype}")
    data = b"".join(v.to_bytes(width, "little", signed=signed) for v in values)
    return count, data


def main():
    args = [a for a in sys.argv[1:] if a != "--any-header"]
    if not 1 <= len(args) <= 2:
        sys.exit(__doc__)
    src = open(args[0], "rb").read()
    digest = hashlib.sha256(src).hexdigest()
    if digest != HEADER_SHA256 and "--any-header" not in sys.argv:
        sys.exit(f"{args[0]}: sha256 {digest}, expected {HEADER_SHA256}")
    text = src.decode("utf-8")
    out = bytearray(b"AKIQTAB1")
    out += struct.pack("<I", len(TABLES))
    for name, width, signed in TABLES:
        count, data = extract(text, name, width, signed)
        out += struct.pack("<B", len(name)) + name.encode("ascii")
        out += struct.pack("<BBI", width, int(signed), count)
        out += data
    dest = args[1] if len(args) == 2 else "iq_tables.bin"
    with open(dest, "wb") as f:
        f.write(out)
    print(f"{dest}: {len(out)} bytes, sha256 {hashlib.sha256(out).hexdigest()}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write a synthetic sentencepiece tokenizer for a generated bench checkpoint.

The bench base (bench/gen_tinyllama.py) has random weights and no tokenizer, but llama.cpp's
convert_hf_to_gguf.py will not convert a model without one. This writes a unigram
sentencepiece `tokenizer.model` with exactly VOCAB pieces (no training: the pieces are made in
code, so the file is the same on every run) and a `tokenizer_config.json`, the same way
fixtures/gguf/generate.py makes the 128-piece tokenizer of its tiny base. The tokenizer only
goes into the GGUF's `tokenizer.ggml.*` metadata; no tensor depends on it.

Usage: make_sp_tokenizer.py DIR [--vocab N]    (needs sentencepiece and protobuf; the reference
venv ~/.cache/adapterkit-reference/venv has both)
"""

import argparse
import json
from pathlib import Path


def make_tokenizer_model(path, vocab):
    from sentencepiece import sentencepiece_model_pb2 as pb
    import sentencepiece as spm

    m = pb.ModelProto()
    P = pb.ModelProto.SentencePiece

    def add(piece, score, typ):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, score, typ

    add("<unk>", 0.0, P.UNKNOWN)
    add("<s>", 0.0, P.CONTROL)
    add("</s>", 0.0, P.CONTROL)
    pieces = ["\u2581"]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += [chr(c) for c in range(ord("0"), ord("9") + 1)]
    pieces += ["\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    i = 0
    for piece in pieces:
        if len(m.pieces) >= vocab:
            break
        add(piece, -1.0 - 0.001 * i, P.NORMAL)
        i += 1
    while len(m.pieces) < vocab:
        add("\u2581w%d" % len(m.pieces), -1.0 - 0.001 * i, P.NORMAL)
        i += 1
    m.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    m.trainer_spec.vocab_size = vocab
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.escape_whitespaces = True
    Path(path).write_bytes(m.SerializeToString())
    sp = spm.SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    assert sp.vocab_size() == vocab, (sp.vocab_size(), vocab)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--vocab", type=int, default=None, help="pieces (default: vocab_size of DIR/config.json)")
    a = ap.parse_args()
    vocab = a.vocab
    if vocab is None:
        vocab = json.loads((a.dir / "config.json").read_text())["vocab_size"]
    if vocab < 70:
        ap.error("--vocab must be at least 70")
    make_tokenizer_model(a.dir / "tokenizer.model", vocab)
    (a.dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "note": "synthetic %d-piece sentencepiece vocab (bench/make_sp_tokenizer.py) so convert_hf_to_gguf.py "
                "accepts the generated model" % vocab,
            },
            indent=2,
        )
        + "\n"
    )
    print("make_sp_tokenizer: %d pieces -> %s" % (vocab, a.dir / "tokenizer.model"))


if __name__ == "__main__":
    main()

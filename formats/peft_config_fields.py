#!/usr/bin/env python3
"""Find the first PEFT release in which each config field appears.

Usage: python3 formats/peft_config_fields.py PEFT_GIT_DIR [--wheel peft-X.Y.Z-py3-none-any.whl ...] [-o OUT.json]

PEFT_GIT_DIR is a clone of https://github.com/huggingface/peft (a bare git dir
works too). For every release tag v0.X.Y (pre-release tags such as v0.18.0.rc0
are skipped) the script reads the Python sources under src/peft/ at that tag,
parses them with `ast` (nothing is imported or executed), and collects the
dataclass fields of

  * the base config: PeftConfig and its parents (PeftConfigMixin), and
  * every tuner config: a class that derives from PeftConfig and sets
    `self.peft_type = PeftType.X` in `__post_init__`. It is keyed by the value
    of PeftType.X ("LORA", "IA3", ...). Its fields include those it inherits
    from intermediate classes (LycorisConfig, PromptLearningConfig, LoraConfig
    for AdaLoraConfig, ...), but not the base config's fields.

A field is an annotated assignment in the class body (`name: type = ...` or
`name: type`), other than ClassVar annotations. For each field the output gives
the first tag that has it. Fields that an older tag has but the newest tag does
not are listed under "removed", with the last tag that had them. Fields and
configs on the default branch (HEAD) that no release has yet are listed under
"unreleased_at_head".

Releases whose tag the git directory lacks (a stale clone) can be added with
--wheel: the PyPI wheel of that release, whose peft/ sources are read the same
way and counted as release "vX.Y.Z". A wheel whose version also has a tag is
compared with the tag, and a difference in fields is reported as an error.

Only the Python standard library is used.
"""

import argparse
import ast
import json
import re
import subprocess
import sys
import zipfile

TAG_RE = re.compile(r"^v0\.(\d+)\.(\d+)$")
BASE_CLASSES = ("PeftConfigMixin", "PeftConfig")


def git(gitdir, *args, data=None):
    return subprocess.run(
        ["git", "--git-dir", gitdir, *args],
        input=data,
        check=True,
        stdout=subprocess.PIPE,
    ).stdout


def release_tags(gitdir):
    tags = git(gitdir, "tag", "-l", "v0.*").decode().split()
    rel = [t for t in tags if TAG_RE.match(t)]
    skipped = sorted(set(tags) - set(rel))
    rel.sort(key=lambda t: tuple(int(x) for x in TAG_RE.match(t).groups()))
    return rel, skipped


def wanted(text):
    return "dataclass" in text or "class PeftType" in text


def read_wheel(path):
    """Return (tag, {path: text}) for the peft/*.py files of a PyPI wheel of peft."""
    m = re.match(r"^peft-(0\.\d+\.\d+)-", path.replace("\\", "/").rsplit("/", 1)[-1])
    if not m:
        sys.exit(f"error: {path}: not a wheel of a peft release (peft-0.X.Y-*.whl)")
    texts = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.startswith("peft/") and name.endswith(".py"):
                text = zf.read(name).decode("utf-8", errors="replace")
                if wanted(text):
                    texts["src/" + name] = text
    return "v" + m.group(1), texts


def read_sources(gitdir, tag):
    """Return {path: text} for the .py files under src/peft/ at tag that mention dataclasses."""
    listing = git(gitdir, "ls-tree", "-r", tag, "--", "src/peft").decode().splitlines()
    entries = []
    for line in listing:
        meta, path = line.split("\t", 1)
        _mode, kind, sha = meta.split()
        if kind == "blob" and path.endswith(".py"):
            entries.append((path, sha))
    out = git(gitdir, "cat-file", "--batch", data="".join(s + "\n" for _, s in entries).encode())
    texts = {}
    pos = 0
    for path, sha in entries:
        nl = out.index(b"\n", pos)
        header = out[pos:nl].split()
        size = int(header[2])
        body = out[nl + 1 : nl + 1 + size]
        pos = nl + 1 + size + 1
        text = body.decode("utf-8", errors="replace")
        if wanted(text):
            texts[path] = text
    return texts


def annotation_is_classvar(ann):
    node = ann.value if isinstance(ann, ast.Subscript) else ann
    if isinstance(node, ast.Name):
        return node.id == "ClassVar"
    if isinstance(node, ast.Attribute):
        return node.attr == "ClassVar"
    return False


def base_name(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def parse_module(path, text):
    """Return (classes, peft_type_enum) found at module level."""
    tree = ast.parse(text, filename=path)
    classes = {}
    enum = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        if node.name == "PeftType":
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                ):
                    enum[stmt.targets[0].id] = stmt.value.value
            continue
        fields = []
        peft_type = None
        for stmt in node.body:
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and not annotation_is_classvar(stmt.annotation)
            ):
                fields.append(stmt.target.id)
            if isinstance(stmt, ast.FunctionDef) and stmt.name == "__post_init__":
                for sub in ast.walk(stmt):
                    if (
                        isinstance(sub, ast.Assign)
                        and len(sub.targets) == 1
                        and isinstance(sub.targets[0], ast.Attribute)
                        and sub.targets[0].attr == "peft_type"
                        and isinstance(sub.targets[0].value, ast.Name)
                        and sub.targets[0].value.id == "self"
                        and isinstance(sub.value, ast.Attribute)
                        and base_name(sub.value.value) == "PeftType"
                    ):
                        peft_type = sub.value.attr
        classes[node.name] = {
            "path": path,
            "bases": [b for b in (base_name(x) for x in node.bases) if b],
            "fields": fields,
            "peft_type_member": peft_type,
        }
    return classes, enum


def snapshot(tag, sources):
    """Return (base_fields, {peft_type: {"class", "path", "fields"}}) from {path: text}."""
    by_name = {}
    enum = {}
    for path, text in sorted(sources.items()):
        try:
            classes, en = parse_module(path, text)
        except SyntaxError as exc:
            print(f"warning: {tag}:{path}: {exc}", file=sys.stderr)
            continue
        enum.update(en)
        for name, info in classes.items():
            by_name.setdefault(name, []).append(info)

    def lookup(name, from_path):
        cands = by_name.get(name, [])
        for c in cands:
            if c["path"] == from_path:
                return c
        return cands[0] if cands else None

    def mro(name, path, seen=None):
        """Depth-first list of (class name, info) for name and its known bases."""
        seen = set() if seen is None else seen
        info = lookup(name, path)
        if info is None or name in seen:
            return []
        seen.add(name)
        out = [(name, info)]
        for b in info["bases"]:
            out += mro(b, info["path"], seen)
        return out

    base_fields = []
    for name, info in mro("PeftConfig", None):
        if name in BASE_CLASSES:
            base_fields += [f for f in info["fields"] if f not in base_fields]

    tuners = {}
    for name, infos in by_name.items():
        for info in infos:
            member = info["peft_type_member"]
            if member is None or name in BASE_CLASSES:
                continue
            chain = mro(name, info["path"])
            names = [n for n, _ in chain]
            if "PeftConfig" not in names:
                continue
            fields = []
            for n, i in chain:
                if n in BASE_CLASSES:
                    continue
                fields += [f for f in i["fields"] if f not in fields and f not in base_fields]
            key = enum.get(member, member)
            if key in tuners and tuners[key]["class"] != name:
                print(
                    f"warning: {tag}: {key} set by both {tuners[key]['class']} and {name}",
                    file=sys.stderr,
                )
                continue
            tuners[key] = {"class": name, "path": info["path"], "fields": fields}
    return base_fields, tuners


def track(history, tags):
    """history: {tag: list of fields or None}. Return (first, removed, gaps)."""
    first, last, present = {}, {}, {}
    for t in tags:
        fields = history.get(t)
        if fields is None:
            continue
        for f in fields:
            first.setdefault(f, t)
            last[f] = t
            present.setdefault(f, []).append(t)
    latest = history.get(tags[-1]) or []
    fields = {f: first[f] for f in first if f in latest}
    removed = {f: last[f] for f in first if f not in latest}
    gaps = {}
    exist = [t for t in tags if history.get(t) is not None]
    for f, ts in present.items():
        span = exist[exist.index(ts[0]) : exist.index(ts[-1]) + 1]
        if ts != span:
            gaps[f] = [t for t in span if t not in ts]
    return fields, removed, gaps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gitdir", help="path of a huggingface/peft git directory")
    ap.add_argument(
        "--wheel",
        action="append",
        default=[],
        help="PyPI wheel of a peft release whose tag the git dir lacks (repeatable)",
    )
    ap.add_argument("-o", "--output", default="-", help="output JSON file (default: stdout)")
    args = ap.parse_args()

    tags, skipped = release_tags(args.gitdir)
    if not tags:
        sys.exit("error: no v0.X.Y tags found")
    sources = {tag: None for tag in tags}  # None: read from git
    origin = {tag: "git tag" for tag in tags}
    for whl in args.wheel:
        tag, texts = read_wheel(whl)
        if tag in sources:
            # The tag is there: check that the wheel agrees with it.
            a = snapshot(tag, read_sources(args.gitdir, tag))
            b = snapshot(tag, texts)
            fa = (a[0], {k: v["fields"] for k, v in a[1].items()})
            fb = (b[0], {k: v["fields"] for k, v in b[1].items()})
            if fa != fb:
                sys.exit(f"error: {whl} and git tag {tag} have different config fields")
            print(f"{whl}: agrees with git tag {tag}", file=sys.stderr)
            continue
        sources[tag] = texts
        origin[tag] = "PyPI wheel " + whl.replace("\\", "/").rsplit("/", 1)[-1]
    tags = sorted(sources, key=lambda t: tuple(int(x) for x in TAG_RE.match(t).groups()))
    base_hist = {}
    tuner_hist = {}
    tuner_meta = {}
    for tag in tags:
        print(f"reading {tag} ({origin[tag]})", file=sys.stderr)
        texts = sources[tag] if sources[tag] is not None else read_sources(args.gitdir, tag)
        base_fields, tuners = snapshot(tag, texts)
        base_hist[tag] = base_fields
        for key, info in tuners.items():
            tuner_hist.setdefault(key, {})[tag] = info["fields"]
            tuner_meta[key] = {"class": info["class"], "path": info["path"]}

    latest = tags[-1]
    base, base_removed, base_gaps = track(base_hist, tags)
    out_tuners = {}
    removed_configs = {}
    for key in sorted(tuner_hist):
        hist = tuner_hist[key]
        seen = [t for t in tags if t in hist]
        fields, removed, gaps = track(hist, tags)
        entry = {
            "class": tuner_meta[key]["class"],
            "path": tuner_meta[key]["path"],
            "first_tag": seen[0],
        }
        if latest not in hist:
            entry["last_tag"] = seen[-1]
            removed_configs[key] = seen[-1]
            # for a config that is gone, list its fields as of its last tag
            hist2 = {t: hist.get(t) for t in tags if t in hist}
            fields, removed, gaps = track(hist2, [t for t in tags if t in hist])
        entry["fields"] = fields
        entry["removed"] = removed
        if gaps:
            entry["absent_in"] = gaps
        out_tuners[key] = entry

    lora = out_tuners["LORA"]
    latest_git = [t for t in tags if origin[t] == "git tag"][-1]
    result = {
        "source": "huggingface/peft git tags",
        "generated_by": "formats/peft_config_fields.py",
        "peft_head": git(args.gitdir, "rev-parse", "HEAD").decode().strip(),
        "latest_tag": latest,
        "latest_tag_origin": origin[latest],
        "latest_git_tag": latest_git,
        "latest_git_tag_commit": git(args.gitdir, "rev-parse", latest_git + "^{commit}").decode().strip(),
        "tags": tags,
        "from_wheels": {t: origin[t] for t in tags if origin[t] != "git tag"},
        "skipped_tags": skipped,
        "base": base,
        "lora": lora["fields"],
        "removed": {**base_removed, **lora["removed"]},
        "base_removed": base_removed,
        "lora_removed": lora["removed"],
        "tuners": out_tuners,
        "removed_configs": removed_configs,
    }
    if base_gaps:
        result["base_absent_in"] = base_gaps

    # What the default branch has that no release has yet (informational).
    # Skipped when the newest release came from a wheel: HEAD of a clone that
    # lacks that release's tag is older than it.
    if origin[latest] != "git tag":
        result["unreleased_at_head"] = None
        result["unreleased_note"] = (
            "not computed: the git dir lacks tag " + latest + ", so its HEAD predates the newest release"
        )
        write(args.output, result)
        return
    head_base, head_tuners = snapshot("HEAD", read_sources(args.gitdir, "HEAD"))
    unreleased = {}
    extra = [f for f in head_base if f not in base]
    if extra:
        unreleased["base"] = extra
    for key, info in sorted(head_tuners.items()):
        if key not in out_tuners or key in removed_configs:
            unreleased[key] = {"new_config": info["class"], "fields": info["fields"]}
        else:
            extra = [f for f in info["fields"] if f not in out_tuners[key]["fields"]]
            if extra:
                unreleased[key] = extra
    result["unreleased_at_head"] = unreleased
    write(args.output, result)


def write(output, result):
    text = json.dumps(result, indent=2) + "\n"
    if output == "-":
        sys.stdout.write(text)
    else:
        with open(output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

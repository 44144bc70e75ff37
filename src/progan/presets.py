"""`progan init --preset NAME [--folder DIR | --url URL] [--dataset NAME]`: write params.yaml from an official
configuration.

The presets live in workflow/presets/<name>.yaml, every value commented with the official file and line it comes
from: the TF release's `config.py` presets (v1-1gpu, v2-1gpu, v2-2gpus, v2-4gpus, v2-8gpus) for CelebA 128 and for
CelebA-HQ 1024, v2-1gpu for CIFAR-10 and for the LSUN categories at 256 px (`--dataset lsun-CATEGORY` picks one of
config.py's 30 dataset lines), and the paper's Table 1 CelebA 128 and CIFAR-10 configs (Theano code). `--list` shows
them.

One preset, BASE (the default params.yaml, of which the repository's params.yaml is a copy), is a complete file; every
other preset, and the CPU demo's workflow/params.demo.yaml, holds only what differs from it: its own header (the
leading comment lines), then the lines of the keys it changes, each with its own comment, nested under bare section
lines (`train:`). `expand` writes the base with those lines put in place of the base's, so a key the delta does not
write keeps the base's value and comment; a section line with a comment replaces the base's; a block in WHOLE
(the schedule, one entry per resolution 4 .. crop.size) is replaced whole. Blank lines and comments below the header
are notes for the reader and are not written out.
Adding a key: the schema (schemas/params.schema.yaml), the base preset with its comment, params.yaml (the same line;
tests/test_presets.py checks it is the base), and the code that reads it. A preset or the demo writes the key only
where its value or source differs.

The text is written as it is (comments kept); `--folder` / `--url` only change the data lines. An existing params.yaml
with other contents is kept unless `--force`. dvc.yaml follows params.yaml (its stages list the resolutions 4 ..
crop.size), so in a project folder (one with a dvc.yaml or the Snakefile) it is regenerated when it differs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import yaml

from progan import params as params_mod
from progan.errors import ProganError
from progan.fileio import write_text

HQ_PLACEHOLDER = "celebahq-1024"    # the data.folder the CelebA-HQ presets ship with (images cannot be downloaded)
BASE = "celeba128-v2-1gpu"          # the complete preset the others are written against (the default params.yaml)
WHOLE = ("train.stages",)           # blocks a preset replaces whole: a schedule has exactly the resolutions it trains
_KEY_LINE = re.compile(r'( *)("[^"]+"|[A-Za-z_][A-Za-z0-9_]*):(\s.*|)')


def presets_dir() -> Path:
    from progan.pipeline import repo_root

    return repo_root() / "workflow" / "presets"


def names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def description(name: str) -> str:
    """The preset's one-line description: its first line, `# preset NAME: ...`."""
    first = preset_path(name).read_text(encoding="utf-8").split("\n", 1)[0]
    return first.split(": ", 1)[1] if first.startswith(f"# preset {name}: ") else ""


def preset_path(name: str) -> Path:
    path = presets_dir() / f"{name}.yaml"
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name) or not path.is_file():
        raise ProganError(f"--preset {name}: no such preset; `progan init --list` shows them "
                          f"({', '.join(names())})")
    return path


def _parse(text: str) -> tuple[list[str], list[tuple[str | None, list[str]]]]:
    """(header, entries) of a params file laid out as ours are: the leading comment lines, then for each key line
    (dotted key, [the line, the more-indented comment lines right below it that continue its comment]), and
    (None, [line]) for a blank line or another comment."""
    lines = text.splitlines()
    n = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    entries: list[tuple[str | None, list[str]]] = []
    path: list[tuple[int, str]] = []                    # (indent, key) of the key line and the sections around it
    for line in lines[n:]:
        m = _KEY_LINE.fullmatch(line)
        indent = len(line) - len(line.lstrip())
        if m:
            while path and path[-1][0] >= indent:
                path.pop()
            path.append((indent, m.group(2).strip('"')))
            entries.append((".".join(key for _, key in path), [line]))
        elif line.lstrip().startswith("#") and entries and entries[-1][0] and indent > path[-1][0]:
            entries[-1][1].append(line)
        else:
            entries.append((None, [line]))
    return lines[:n], entries


def _under(key: str, block: str) -> bool:
    return key == block or key.startswith(block + ".")


def _bare(lines: list[str]) -> bool:
    """A section line with neither value nor comment (`train:`): it only nests the keys below it."""
    return len(lines) == 1 and _KEY_LINE.fullmatch(lines[0]).group(3).strip() == ""


def _merged(base: dict, delta: dict, prefix: str = "") -> dict:
    """The values: `base` with `delta`'s put in, WHOLE blocks replaced."""
    out = dict(base)
    for key, value in delta.items():
        dotted = f"{prefix}{key}"
        nested = isinstance(value, dict) and isinstance(base.get(key), dict) and dotted not in WHOLE
        out[key] = _merged(base[key], value, dotted + ".") if nested else value
    return out


def expand(delta_text: str, where: str) -> str:
    """The complete params text of a preset written as what differs from BASE (the module docstring says how)."""
    base_text = (presets_dir() / f"{BASE}.yaml").read_text(encoding="utf-8")
    base_header, base = _parse(base_text)
    header, delta = _parse(delta_text)
    known = {key for key, _ in base if key}
    mine: dict[str, list[str]] = {}
    for key, lines in delta:
        if key is None:
            continue
        if key in mine:
            raise ProganError(f"{where}: {key} is written twice")
        if key not in known and not any(_under(key, block) for block in WHOLE):
            raise ProganError(f"{where}: {key} is not in the base preset workflow/presets/{BASE}.yaml; a preset "
                              f"writes only what differs from the base, so add the key there first")
        mine[key] = lines
    out = list(header or base_header)
    for key, lines in base:
        block = next((b for b in WHOLE if key and _under(key, b) and b in mine), None)
        if block is not None:                           # the delta's block in place of the base's
            if key == block:
                out += [line for k, ls in delta if k and _under(k, block) for line in ls]
        elif key in mine and not _bare(mine[key]):
            out += mine[key]
        else:
            out += lines
    text = "\n".join(out) + "\n"
    try:
        same = yaml.safe_load(text) == _merged(yaml.safe_load(base_text), yaml.safe_load(delta_text) or {})
    except yaml.YAMLError:
        same = False
    if not same:
        raise ProganError(f"{where}: does not expand to the base with its values put in: write each key on a line "
                          f"of its own, nested as in workflow/presets/{BASE}.yaml")
    return text


def full_text(name: str) -> str:
    """The complete params.yaml text of preset `name`, comments kept."""
    path = preset_path(name)
    text = path.read_text(encoding="utf-8")
    return text if name == BASE else expand(text, f"workflow/presets/{path.name}")


def load(name: str) -> params_mod.Params:
    """Preset `name` as validated params (its data lines as shipped)."""
    data = yaml.safe_load(full_text(name))
    params_mod.validate(data, f"preset {name}")
    return params_mod.Params(data, preset_path(name))


def _set_data_line(text: str, key: str, value, comment: str | None = None) -> str:
    """Replace the value of `  key:` in the data section, keeping its comment (or writing `comment`)."""
    start = text.index("\ndata:\n") + len("\ndata:\n")
    end = re.search(r"(?m)^\S", text[start:])
    end = start + (end.start() if end else len(text) - start)
    plain = value is None or (re.fullmatch(r"[A-Za-z0-9_./~+-][A-Za-z0-9_./~+:=-]*", value) is not None
                              and yaml.safe_load(value) == value)
    written = "null" if value is None else (value if plain else json.dumps(value))
    section, n = re.subn(rf"(?m)^(  {key}:) [^#\n]*?(\s+#|$)", lambda m: f"{m.group(1)} {written}{m.group(2)}",
                         text[start:end], count=1)
    if comment is not None:
        section = re.sub(rf"(?m)^(  {key}: [^#\n]*?\s+# ).*$", lambda m: m.group(1) + comment, section, count=1)
    if n != 1:
        raise ProganError(f"preset: data.{key} line not found")
    return text[:start] + section + text[end:]


def _dataset(name: str, text: str, dataset: str) -> str:
    """`--dataset lsun-CATEGORY`: an LSUN preset's data.lsun_category, with its config.py line."""
    from progan.data import lsun

    if yaml.safe_load(text)["data"]["source"] != "lsun":
        raise ProganError(f"--dataset {dataset}: preset {name} is not an LSUN one; --dataset picks the category of "
                          f"an LSUN preset ({', '.join(n for n in names() if n.startswith('lsun'))})")
    category = dataset.removeprefix("lsun-")
    if not dataset.startswith("lsun-") or category not in lsun.CATEGORIES:
        raise ProganError(f"--dataset {dataset}: not one of config.py's LSUN datasets (lsun-" + ", lsun-".join(
            lsun.CATEGORIES) + ")")
    line = lsun.CONFIG_LINE + lsun.CATEGORIES.index(category)
    return _set_data_line(text, "lsun_category", category,
                          f"`-lsun-{category}` (config.py L{line}); `progan init --dataset lsun-CATEGORY` picks any of "
                          f"L61-90")


def render(name: str, folder: str | None = None, url: str | None = None, out_dir: Path | None = None,
           dataset: str | None = None) -> str:
    """The params.yaml text of preset `name` with the data source changed, validated."""
    text = full_text(name)
    if dataset is not None:
        text = _dataset(name, text, dataset)
    data = yaml.safe_load(text)["data"]
    out_dir = Path(out_dir or Path.cwd()).absolute()
    if folder is not None:
        where = Path(folder).expanduser()
        if not where.absolute().is_dir():
            raise ProganError(f"--folder {folder}: no such folder of images")
        value = str(where) if where.is_absolute() else os.path.relpath(where.absolute(), out_dir)
        if data["source"] != "lsun":                    # an LSUN preset's folder is the LMDB database, read in place
            text = _set_data_line(text, "source", "folder")
        text = _set_data_line(text, "folder", value)
    elif url is not None:
        if not re.match(r"^(https?|file)://", url):
            raise ProganError(f"--url {url}: must be an http://, https:// or file:// URL of an archive (zip, tar.*)")
        if data["source"] not in ("celeba", "cifar10", "lsun"):     # their own formats, checksums: url = a mirror
            text = _set_data_line(_set_data_line(text, "source", "url"), "folder", None)
        text = _set_data_line(text, "url", url)
    elif data["source"] == "folder" and data["folder"] == HQ_PLACEHOLDER and not (out_dir / HQ_PLACEHOLDER).is_dir():
        raise ProganError(f"--preset {name} trains on CelebA-HQ, which cannot be downloaded automatically: pass "
                          f"--folder DIR (the 30,000 1024x1024 images of the official dataset_tool.py "
                          f"create_celebahq) or --url URL (an archive of them)")
    params_mod.validate(yaml.safe_load(text), f"preset {name}")
    return text


def write(name: str, target: Path, folder: str | None = None, url: str | None = None, force: bool = False,
          dataset: str | None = None) -> list[str]:
    """Write `target` (params.yaml) from the preset, and dvc.yaml beside it in a project folder; returns what was
    written."""
    target = Path(target).absolute()
    text = render(name, folder, url, target.parent, dataset)
    written = []
    if target.exists() and target.read_text(encoding="utf-8") != text:
        if not force:
            raise ProganError(f"{target}: exists with other settings; pass --force to replace it with preset {name} "
                              f"(or --params OTHER.yaml)")
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text(target, text)
        written.append(str(target))
    dvc = target.parent / "dvc.yaml"
    if target.name == "params.yaml" and (dvc.exists() or (target.parent / "Snakefile").exists()):
        from progan import pipeline

        new = pipeline.dvc_yaml(params_mod.load(target))      # the stages follow crop.size
        if not dvc.exists() or dvc.read_text(encoding="utf-8") != new:
            write_text(dvc, new)
            written.append(str(dvc))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="progan init", description=__doc__.split("\n")[0].split(": ", 1)[1],
        epilog=f"Presets live in workflow/presets/: {BASE} complete, the others as what differs from it; their "
               "comments cite the official code. Example: progan init --preset celeba128-v2-8gpus")
    parser.add_argument("--preset", metavar="NAME", help="the preset to write (see --list)")
    parser.add_argument("--list", action="store_true", help="list the presets, one line each")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--folder", metavar="DIR", help="train on the images in DIR (data.source folder)")
    source.add_argument("--url", metavar="URL", help="download the images from URL (an archive; for the CelebA "
                                                     "presets a mirror of img_align_celeba.zip, md5 still checked)")
    parser.add_argument("--dataset", metavar="NAME", help="an LSUN preset's category, as config.py's dataset lines "
                                                          "name it: lsun-bedroom, lsun-car, ... (30 in all)")
    parser.add_argument("--params", default="params.yaml", metavar="PATH", help="file to write (default: ./params.yaml)")
    parser.add_argument("--force", action="store_true", help="replace an existing params file with other settings")
    args = parser.parse_args(argv)
    if args.list:
        for name in names():
            print(f"{name:<26} {description(name)}")
        return 0
    if not args.preset:
        parser.error("give --preset NAME (or --list)")
    try:
        written = write(args.preset, Path(args.params), args.folder, args.url, args.force, args.dataset)
    except ProganError as e:
        print(f"progan init: error: {e}", file=sys.stderr)
        return 1
    if written:
        print(f"progan init: preset {args.preset}: wrote {', '.join(written)}", file=sys.stderr)
    else:
        print(f"progan init: {args.params} is already preset {args.preset}; nothing to write", file=sys.stderr)
    return 0

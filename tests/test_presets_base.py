"""Presets as one base plus what differs (issue #26): every preset and the demo expand to the complete params files
they were before, value by value and comment by comment; a delta that names a key the base lacks is refused."""
from __future__ import annotations

import difflib
import subprocess

import pytest
import yaml

from progan import demo, presets
from progan.errors import ProganError

from helpers import REPO

# The last commit at which every preset and workflow/params.demo.yaml were complete files. Their expansions now must
# say what those files said; keys added to the base since then may only add lines.
COMPLETE_FILES_COMMIT = "b05a4cb"
# Deliberate changes since: the demo's header says how its file is now written out.
DEMO_HEADER_CHANGE = ("copies this file to demo/params.yaml", "writes it out in full to demo/params.yaml")


def _as_of_complete_files(path: str) -> str:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the complete preset files of the past are read with git show")
    done = subprocess.run(["git", "-C", str(REPO), "show", f"{COMPLETE_FILES_COMMIT}:{path}"], capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        shallow = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"],
                                 capture_output=True, text=True, timeout=60).stdout.strip() == "true"
        if shallow:
            pytest.skip(f"a shallow clone has no commit {COMPLETE_FILES_COMMIT}: `git fetch --unshallow` to run this")
    assert done.returncode == 0, f"git show {COMPLETE_FILES_COMMIT}:{path}: {done.stderr}"
    return done.stdout


def _leaves(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, sub in node.items() for k, v in _leaves(sub, f"{prefix}.{key}" if prefix else key).items()}


def _same_values(old: str, new: str) -> set[str]:
    """Every value of `old` is in `new`, unchanged; returns the keys `new` adds."""
    old_values, new_values = _leaves(yaml.safe_load(old)), _leaves(yaml.safe_load(new))
    assert {k: new_values.get(k, "MISSING") for k in old_values} == old_values
    return set(new_values) - set(old_values)


# Presets added since (issue #29): written as deltas from the start, no complete file of before to compare with.
NEWER_PRESETS = {"cifar10-v2-1gpu", "lsun256-v2-1gpu", "paper-cifar10"}


def test_every_preset_expands_to_its_complete_file_of_before():
    for name in sorted(set(presets.names()) - NEWER_PRESETS):
        old, new = _as_of_complete_files(f"workflow/presets/{name}.yaml"), presets.full_text(name)
        added = _same_values(old, new)
        # comment by comment: every line of the old file is in the expansion, in order (value, comment and spacing);
        # the expansion only inserts the lines of keys added since
        old_lines, new_lines = old.splitlines(), new.splitlines()
        ops = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False).get_opcodes()
        assert [op for op in ops if op[0] not in ("equal", "insert")] == [], name
        names = {part for key in added for part in key.split(".")}
        for tag, _, _, j1, j2 in ops:
            for line in new_lines[j1:j2] if tag == "insert" else []:
                assert line.split(":")[0].strip().strip('"') in names, (name, line)
        assert len(new_lines) == len(old_lines) + sum(j2 - j1 for tag, _, _, j1, j2 in ops if tag == "insert")
        # and the files themselves hold only what differs: no key line the same as the base's
        if name != presets.BASE:
            _, base = presets._parse(presets.full_text(presets.BASE))
            _, delta = presets._parse((REPO / "workflow/presets" / f"{name}.yaml").read_text())
            base_lines = {key: lines for key, lines in base if key}
            assert [k for k, lines in delta if k and not k.startswith("train.stages") and not presets._bare(lines)
                    and lines == base_lines[k]] == [], name


def test_the_newer_presets_write_only_what_differs():
    _, base = presets._parse(presets.full_text(presets.BASE))
    base_lines = {key: lines for key, lines in base if key}
    for name in sorted(NEWER_PRESETS):
        _, delta = presets._parse((REPO / "workflow/presets" / f"{name}.yaml").read_text())
        assert [k for k, lines in delta if k and not k.startswith("train.stages") and not presets._bare(lines)
                and lines == base_lines[k]] == [], name
        assert set(yaml.safe_load(presets.full_text(name))) == set(yaml.safe_load(presets.full_text(presets.BASE)))


def test_the_demo_expands_to_its_values_of_before_with_the_base_comments_where_it_changes_nothing():
    old = _as_of_complete_files("workflow/params.demo.yaml").replace(*DEMO_HEADER_CHANGE)
    new = demo.template()
    _same_values(old, new)
    old_header, old_entries = presets._parse(old)
    new_header, new_entries = presets._parse(new)
    _, base_entries = presets._parse(presets.full_text(presets.BASE))
    _, delta_entries = presets._parse((REPO / "workflow/params.demo.yaml").read_text())
    assert new_header == old_header
    base, new_lines, written = (dict(e for e in entries if e[0]) for entries in (base_entries, new_entries, delta_entries))
    for key, lines in old_entries:
        if key is None:
            continue
        if key in written and not presets._bare(written[key]) or key.startswith("train.stages"):
            assert new_lines[key] == lines, key            # what the demo writes: its own line, comment and all
        else:
            assert new_lines[key] == base[key], key        # the rest: the base's line (the same value, checked above)


def _expand(body: str) -> str:
    return presets.expand("# preset t: test\n" + body, "t.yaml")


def test_a_delta_changes_only_its_lines_and_refuses_what_the_base_lacks():
    base = presets.full_text(presets.BASE).splitlines()
    text = _expand("train:\n  gpus: 3                    # mine\n").splitlines()
    assert text[0] == "# preset t: test" and not set(text) & set(presets._parse("\n".join(base))[0])
    changed = [(a, b) for a, b in zip(base[10:], text[1:]) if a != b]
    assert len(text) == len(base) - 9 and changed == [(next(x for x in base if x.startswith("  gpus:")),
                                                       "  gpus: 3                    # mine")]
    # a schedule is replaced whole (the resolutions follow crop.size)
    two = _expand('crop:\n  size: 8  # c\ntrain:\n  stages:  # s\n    "4": {batch: 4, lr: 0.1, transition_kimg: 0, '
                  'stabilize_kimg: 1}\n    "8": {batch: 4, lr: 0.1, transition_kimg: 1, stabilize_kimg: 1}\n')
    assert list(yaml.safe_load(two)["train"]["stages"]) == ["4", "8"] and "  stages:  # s" in two.splitlines()
    for body, message in (
            ("train:\n  warp_speed: 9  # mine\n", r"^t.yaml: train.warp_speed is not in the base preset "
                                                  r"workflow/presets/celeba128-v2-1gpu.yaml; a preset writes only "
                                                  r"what differs from the base, so add the key there first$"),
            ("seed: 1  # a\nseed: 2  # b\n", r"^t.yaml: seed is written twice$"),
            ("evaluate:\n  fid: {num_images: 10}\n", r"^t.yaml: does not expand to the base with its values put in")):
        with pytest.raises(ProganError, match=message):
            _expand(body)

"""Load and validate params.yaml: the single source of truth for every knob of every stage.

`load(path)` validates against `schemas/params.schema.yaml` (mirrored at workflow/schemas/) plus the
checks a schema cannot express, and returns a read-only `Params` with attribute access
(`p.crop.size`, `p.train.stages["16"].lr`). Every error is one line naming the key:
    params.yaml: crop.size must be a power of two >= 8 and <= 1024, got 100
"""
from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

import jsonschema
import yaml

from progan.params_file import (MAX_FILE_BYTES, ParamsError, cut, parse,  # noqa: F401 (parse, the limits: re-exported)
                                read_text, short)

DEFAULT_PATH = "params.yaml"


class Section(Mapping):
    """Read-only view of a params mapping with attribute access; nested mappings are Sections too.

    `_reads`, when a set (Params.recording), collects the dotted key of every value read through it: a leaf by
    item or attribute access, a whole section by `to_dict` (tests/test_params_read.py)."""

    __slots__ = ("_data", "_key", "_reads")

    def __init__(self, data: Mapping[str, Any], key: str = "", reads: set | None = None):
        object.__setattr__(self, "_data", dict(data))
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_reads", reads)

    def _record(self, key: str) -> None:
        if self._reads is not None:
            self._reads.add(key)

    def __getitem__(self, name: str) -> Any:
        value = self._data[name]
        key = f"{self._key}.{name}" if self._key else str(name)
        if isinstance(value, Mapping):
            return Section(value, key, self._reads)
        self._record(key)
        if isinstance(value, list):
            return tuple(value)
        return value

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"params has no key {self._key + '.' if self._key else ''}{name}") from None

    def __setattr__(self, name, value):
        raise AttributeError("params are read-only")

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Section({self._key or 'params'}: {self._data!r})"

    def to_dict(self) -> dict:
        self._record(self._key)                     # the whole section ("" = all of params.yaml)
        return json.loads(json.dumps(self._data))


class Params(Section):
    """The whole params.yaml. `root` is the folder holding it: every relative path is taken from there."""

    __slots__ = ("path",)

    def __init__(self, data: Mapping[str, Any], path: Path, reads: set | None = None):
        super().__init__(data, "", reads)
        object.__setattr__(self, "path", path)

    def recording(self) -> "Params":
        """The same params, recording the dotted key of every value read from them in `.reads`."""
        return Params(self._data, self.path, set())

    @property
    def reads(self) -> set[str]:
        return set(self._reads or ())

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def resolutions(self) -> list[int]:
        """Training resolutions train.start_px, ..., crop.size (one training stage each; 4 .. crop.size by default,
        crop.size alone without growing)."""
        return [r for r in self.levels if r >= int(self.train.start_px)]

    @property
    def start_px(self) -> int:
        """The first training stage (official lod_initial_resolution): it starts from scratch, with no fade-in."""
        return int(self.train.start_px)

    @property
    def levels(self) -> list[int]:
        """Pyramid levels 4, 8, ..., crop.size (data/pyramid/<R>.npy), whatever stage training starts at."""
        return [2**k for k in range(2, int(self.crop.size).bit_length())]

    def stage(self, res: int) -> Section:
        return self.train.stages[str(int(res))]

    def get(self, dotted: str, default=None):
        """The value at a dotted key ("" = all of params.yaml, as a dict), else `default`."""
        self._record(dotted)
        if not dotted:
            return self.to_dict()
        value: Any = self._data
        for part in dotted.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return default
            value = value[part]
        return value

    def subset(self, keys: list[str]) -> dict[str, Any]:
        """The values of the dotted keys, e.g. for a Snakemake rule's params."""
        return {k: self.get(k) for k in keys}

    def digest(self) -> str:
        """sha256 of the canonical JSON of all params (tags MLflow runs)."""
        self._record("")
        return hashlib.sha256(json.dumps(self._data, sort_keys=True).encode()).hexdigest()


@lru_cache(maxsize=1)
def schema() -> dict:
    text = resources.files("progan").joinpath("schemas/params.schema.yaml").read_text()
    return yaml.safe_load(text)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _subschema_message(error: jsonschema.ValidationError) -> str | None:
    sch = error.schema if isinstance(error.schema, dict) else {}
    if "x-message" in sch:
        return sch["x-message"]
    parent = error.parent
    while parent is not None:
        if isinstance(parent.schema, dict) and "x-message" in parent.schema:
            return parent.schema["x-message"]
        parent = parent.parent
    return None


def _format_error(name: str, error: jsonschema.ValidationError, root_schema: dict) -> str:
    key = cut(_key_path(error), 200)
    got = short(error.instance) if not isinstance(error.instance, (dict, list)) else None
    if error.validator == "additionalProperties":
        extra = sorted(map(str, set(error.instance) - set(error.schema.get("properties", {}))))
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        where = f"{key}." if error.absolute_path else ""
        return f"{name}: unknown key {where}{cut(extra[0])} (allowed here: {allowed})"
    if error.validator == "required":
        missing = error.message.split("'")[1]
        where = f"{key}." if error.absolute_path else ""
        return f"{name}: missing key {where}{missing} (every key must be written out; see the default params.yaml)"
    if error.validator == "propertyNames":
        return f"{name}: {key} has an unknown key {short(error.instance)}; keys must be the resolutions 4, 8, ..., crop.size as quoted strings"
    # Find the schema node of the failing key to use its x-message.
    node = root_schema
    try:
        for part in error.absolute_path:
            props = node.get("properties", {})
            if part in props:
                node = props[part]
            elif isinstance(node.get("additionalProperties"), dict):
                node = node["additionalProperties"]
            elif "items" in node:
                node = node["items"]
            if "$ref" in node:
                node = root_schema["$defs"][node["$ref"].split("/")[-1]]
    except (AttributeError, KeyError, TypeError):
        node = {}
    msg = node.get("x-message") if isinstance(node, dict) else None
    msg = msg or _subschema_message(error)
    if msg is None:
        if error.validator == "enum":
            msg = "must be one of " + ", ".join(json.dumps(v) for v in error.validator_value)
        elif error.validator == "type":
            types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
            msg = "must be " + " or ".join(types)
        elif error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[error.validator]
            msg = f"must be {op} {error.validator_value}"
        else:
            msg = cut(error.message, 120)       # jsonschema's own text quotes the value
    return f"{name}: {key} {msg}" + (f", got {got}" if got is not None else "")


# Keys that were renamed: old dotted key -> (new key, what it holds). An old params.yaml gets one line saying so.
RENAMED = {
    "train.num_workers": ("train.prefetch", "minibatches one background thread reads ahead of the step, 0 = none; "
                                            "there never were worker processes"),
}


def _renamed_key(data: Mapping, name: str) -> None:
    for old, (new, what) in RENAMED.items():
        section, key = old.rsplit(".", 1)
        node = data.get(section) if isinstance(data, Mapping) else None
        if isinstance(node, Mapping) and key in node:
            raise ParamsError(f"{name}: {old} is now {new} ({what}): rename the key")


def validate(data: Any, name: str = DEFAULT_PATH) -> None:
    """Raise ParamsError with one line naming the first wrong key; return None when `data` is valid."""
    if not isinstance(data, Mapping):
        raise ParamsError(f"{name}: must be a YAML mapping of sections (seed, data, crop, ...), got {type(data).__name__}")
    _renamed_key(data, name)
    root_schema = schema()
    validator = jsonschema.Draft202012Validator(root_schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ParamsError(_format_error(name, errors[0], root_schema))
    # Checks a schema cannot express.
    size, start = data["crop"]["size"], data["train"]["start_px"]
    if start > size:
        raise ParamsError(f"{name}: train.start_px {start} is above crop.size {size}; use at most {size} "
                          f"(train.start_px = crop.size trains at full resolution only, the official -nogrowing)")
    wanted = [str(2**k) for k in range(2, int(size).bit_length()) if 2**k >= start]
    have = list(data["train"]["stages"])
    missing = [r for r in wanted if r not in have]
    extra = [r for r in have if int(r) > size]
    if missing:
        needs = (f"crop.size {size} needs exactly {', '.join(wanted)}" if start == 4 else
                 f"train.start_px {start} to crop.size {size} needs {', '.join(wanted)}")
        raise ParamsError(f"{name}: train.stages has no entry for resolution {missing[0]}; {needs}")
    if extra:
        raise ParamsError(f"{name}: train.stages has resolution {extra[0]} above crop.size {size}; "
                          f"remove it or raise crop.size")
    if data["train"]["stages"][str(start)]["transition_kimg"] != 0:      # entries below start_px are not used
        raise ParamsError(f"{name}: train.stages.{start}.transition_kimg must be 0: {start} px is the first stage "
                          f"(train.start_px), there is nothing to fade in")
    bad = _first_non_finite(data)
    if bad is not None:   # YAML's .nan / .inf pass every schema range check (nan < 0 is false)
        raise ParamsError(f"{name}: {bad[0]} must be a finite number, got {bad[1]}")
    _check_batches(data, name)
    fmap_base, top_stage = data["model"]["fmap_base"], int(size).bit_length() - 2   # official nf(stage), stage = log2(R) - 1
    if fmap_base < 2**top_stage:
        raise ParamsError(f"{name}: model.fmap_base {fmap_base} gives 0 feature maps at {size} px "
                          f"(nf = fmap_base / 2^{top_stage}); use at least {2**top_stage}")
    src = data["data"]["source"]
    if src == "url" and not data["data"]["url"]:
        raise ParamsError(f"{name}: data.url must be set when data.source is url")
    if src == "folder" and not data["data"]["folder"]:
        raise ParamsError(f"{name}: data.folder must be set when data.source is folder")
    if src == "lsun" and not (data["data"]["folder"] or data["data"]["url"] or data["data"]["lsun_category"]):
        raise ParamsError(f"{name}: data.source lsun needs data.lsun_category (an official category), data.url (a zip "
                          f"of its LMDB export) or data.folder (the LMDB folder)")


def _first_non_finite(node: Any, key: str = "") -> tuple[str, str] | None:
    """(dotted key, value) of the first NaN or infinite number in the params, or None."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            found = _first_non_finite(v, f"{key}.{k}" if key else str(k))
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _first_non_finite(v, f"{key}[{i}]")
            if found:
                return found
    elif isinstance(node, float) and not math.isfinite(node):
        return key, str(node)
    return None


def _check_batches(data: Mapping, name: str) -> None:
    """Each stage's batch splits evenly over an explicit train.gpus (official train.py: the minibatch is split
    over the GPUs, tf.split) and each GPU's share into minibatch-stddev groups of
    min(model.mbstd_group_size, share) (official networks.py minibatch_stddev_layer L129-131 reshapes to
    [G, -1, ...]). With train.gpus auto the GPU count is known only when the stage starts, where the same
    checks run (data.Batches, layers.minibatch_stddev)."""
    gpus, group = data["train"]["gpus"], data["model"]["mbstd_group_size"]
    world = gpus if isinstance(gpus, int) and gpus > 1 else (None if gpus == "auto" else 1)
    for res, stage in data["train"]["stages"].items():
        batch = stage["batch"]
        if world is None or int(res) < data["train"]["start_px"]:        # below start_px: never trained
            continue
        if batch % world:
            raise ParamsError(f"{name}: train.stages.{res}.batch {batch} must be divisible by train.gpus {gpus} "
                              f"(each GPU trains on an equal share of the minibatch)")
        share = batch // world
        if group > 1 and share % min(group, share):
            per = f" ({share} per GPU)" if world > 1 else ""
            raise ParamsError(f"{name}: train.stages.{res}.batch {batch}{per} is not divisible into minibatch-stddev "
                              f"groups of model.mbstd_group_size {group}; use a multiple of {group}, or at most {group}")


def load(path: str | Path = DEFAULT_PATH) -> Params:
    path = Path(path).absolute()
    name = path.name
    data = parse(read_text(path, name), name)
    validate(data, name)
    return Params(data, path)

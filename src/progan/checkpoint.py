"""The checkpoint format, in one place: what the three kinds of file hold, how they are written and how they are
read back and checked.

    results/<R>/checkpoint.pt        "progan-checkpoint": a finished stage, the next stage grows from it
        {"format", "version": 1, "res_px", "model": asdict(ModelConfig), "G", "D", "G_ema", "opt_G", "opt_D",
         "cur_nimg" (images of this stage), "total_kimg" (all stages so far), "alpha", "rng" (train/state.py),
         "params": {dotted key: value} of the keys the stage declares (pipeline.py), "prev_checkpoint_sha256"}
    results/<R>/.resume/snapshot.pt  "progan-snapshot": mid-stage state to continue bit-identically
        {"format", "version", "key" (what must match to resume), "cur_nimg", "G", "D", "G_ema", "opt_G", "opt_D",
         "rng" (one per rank), "sampler", "rows" (loss rows so far), "seconds", "params" (all of params.yaml)}
    G.pt (`progan export`)           "progan-generator": G_ema alone
        {"format", "version", "res_px", "model", "G_ema", "alpha"}
    X.pt (`progan import X.pkl`)     "progan-checkpoint" of the official networks: opt_G / opt_D None, "imported"

Writing: `save` (atomic, and byte-stable: the same dict gives the same bytes). Reading: `read` is the one reader;
every file loads with torch.load(weights_only=True), and every problem is one ProganError line naming the file and
what to do (missing, truncated, foreign, a pickle that runs code, another version, another stage, missing keys).
`load_stage` / `load_snapshot` are the training side, `load_generator` the G_ema side (a checkpoint or an export).
A stage grows only from a checkpoint made with the same model.* and the same official feature switches
(`check_grows_from`: one line naming the first key that differs); a file made before a model field existed holds
its default, the official value.
"""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import torch

from progan.errors import ProganError, refused_code_error, torch_load_failure
from progan.fileio import atomic_path, torch_load
from progan.model.networks import Generator, ModelConfig

CHECKPOINT = "progan-checkpoint"
SNAPSHOT = "progan-snapshot"
GENERATOR = "progan-generator"
VERSION = 1
SNAPSHOT_NAME = "snapshot.pt"

# The official switches (config.py L109-116 "Disable individual features") that live in train.*: a checkpoint holds
# their values in "params" (the stage's declared keys), the model.* ones in "model". Growing across a change of
# any of them would mix two experiments in one run. Values for files made before a key existed: its default.
TRAIN_SWITCHES = {"train.start_px": 4, "train.ema_decay": None, "train.reset_opt_each_phase": None}

STAGE_KEYS = ("res_px", "model", "G", "D", "G_ema", "opt_G", "opt_D", "cur_nimg", "total_kimg")
SNAPSHOT_KEYS = ("key", "cur_nimg", "G", "D", "G_ema", "opt_G", "opt_D", "rng", "sampler", "rows", "seconds")
GENERATOR_KEYS = ("res_px", "model", "G_ema")


# ---- writing ------------------------------------------------------------------------------------------------

def save(path: str | Path, obj: dict) -> None:
    """torch.save to a temp file beside `path`, then rename (a killed process never leaves half a file).

    Saved through a file object: given a path, torch.save names the zip's inner folder after the (random) temp
    file, so identical checkpoints would differ in bytes and DVC would re-run every stage downstream."""
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def _cpu(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format) for k, v in state_dict.items()}


def stage_checkpoint(*, res_px: int, cfg: ModelConfig, G, D, G_ema, opt_G, opt_D, cur_nimg: int, total_kimg: float,
                     alpha: float, rng: dict, params: dict, prev_sha256: str | None) -> dict:
    """The results/<R>/checkpoint.pt dict of a finished stage (networks on the CPU, contiguous)."""
    return {"format": CHECKPOINT, "version": VERSION, "res_px": res_px, "model": dataclasses.asdict(cfg),
            "G": _cpu(G.state_dict()), "D": _cpu(D.state_dict()), "G_ema": _cpu(G_ema.state_dict()),
            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "cur_nimg": cur_nimg, "total_kimg": total_kimg,
            "alpha": alpha, "rng": rng, "params": params, "prev_checkpoint_sha256": prev_sha256}


def snapshot(*, key: dict, cur_nimg: int, G, D, G_ema, opt_G, opt_D, rng: list, sampler: dict, rows: list,
             seconds: float, params: dict) -> dict:
    """The results/<R>/.resume/snapshot.pt dict: everything the loop needs to continue bit-identically."""
    return {"format": SNAPSHOT, "version": VERSION, "key": key, "cur_nimg": cur_nimg,
            "G": _cpu(G.state_dict()), "D": _cpu(D.state_dict()), "G_ema": _cpu(G_ema.state_dict()),
            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "rng": rng, "sampler": sampler,
            "rows": list(rows), "seconds": seconds, "params": params}


def generator_export(G: Generator, alpha: float) -> dict:
    """The `progan export` dict: G_ema alone (no D, no optimizer state)."""
    return {"format": GENERATOR, "version": VERSION, "res_px": G.res_px, "model": dataclasses.asdict(G.cfg),
            "G_ema": {k: v.detach().clone() for k, v in G.state_dict().items()}, "alpha": alpha}


def imported_checkpoint(*, res_px: int, cfg: ModelConfig, G: dict, D: dict, G_ema: dict, alpha: float,
                        source: dict) -> dict:
    """A "progan-checkpoint" of networks made elsewhere (`progan import`, progan/official.py): G, D and G_ema with
    no optimizer state (opt_G / opt_D None), no images counted (cur_nimg 0, total_kimg 0: the pickle does not say),
    no RNG state, and `imported` saying where they came from (file name, sha256, lod, static_kwargs)."""
    return {"format": CHECKPOINT, "version": VERSION, "res_px": res_px, "model": dataclasses.asdict(cfg),
            "G": G, "D": D, "G_ema": G_ema, "opt_G": None, "opt_D": None, "cur_nimg": 0, "total_kimg": 0.0,
            "alpha": alpha, "rng": None, "params": {}, "prev_checkpoint_sha256": None, "imported": source}


# ---- reading ------------------------------------------------------------------------------------------------

def _train_hint(res_px: int | None) -> str:
    return f"`progan train --res {res_px}`" if res_px is not None else "the train stage that writes it"


def read(path: str | Path, formats: tuple[str, ...], required: tuple[str, ...], res_px: int | None = None,
         what: str = "checkpoint", fix: str | None = None) -> dict:
    """The dict in `path`, checked: its format is one of `formats`, its version VERSION, it holds `required` and,
    when `res_px` is given, that stage. `what` names the file in messages, `fix` says what to do (default: run the
    train stage again). Loaded on the CPU with weights_only=True: a pickle that would run code is refused."""
    path = Path(path)
    hint = _train_hint(res_px)
    fix = fix or f"delete it and run {hint} again"
    if not path.is_file():
        raise ProganError(f"{path}: {what} not found; run {hint} first")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == b"PK\x03\x04"             # torch.save writes a zip; a cut one has no central directory
    if not head or (is_zip and not zipfile.is_zipfile(path)):
        raise ProganError(f"{path}: {what} is truncated or corrupt ({'empty file' if not head else 'incomplete zip'}); "
                          f"{fix}")
    try:
        obj = torch_load(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file, reported in one line
        blocked, reason, by_unpickler = torch_load_failure(e)
        if blocked:
            raise refused_code_error(path, blocked, f"progan {what}", fix) from None
        if is_zip:
            raise ProganError(f"{path}: {what} is truncated or corrupt ({reason}); {fix}") from None
        how = f"weights_only loading refused it: {reason}; do not load untrusted files" if by_unpickler else reason
        raise ProganError(f"{path}: not a progan {what} (not a torch.save file; {how}); {fix}") from None
    if not isinstance(obj, dict):
        raise ProganError(f"{path}: not a progan {what} (holds a {type(obj).__name__}); {fix}")
    if obj.get("format") not in formats:
        raise ProganError(f"{path}: not a progan {what} (format {obj.get('format')!r}); {fix}")
    if obj.get("version") != VERSION:
        raise ProganError(f"{path}: {what} version {obj.get('version')!r}, this code reads version {VERSION}; {fix}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ProganError(f"{path}: {what} lacks {', '.join(missing)}; {fix}")
    if res_px is not None and obj["res_px"] != res_px:
        raise ProganError(f"{path}: holds the {obj['res_px']} px stage, expected {res_px} px; {fix}")
    check_finite(path, obj, what, fix)
    return obj


def check_finite(path: Path, obj: dict, what: str, fix: str) -> None:
    """Refuse NaN or inf in the weights of G, D or G_ema (a diverged run or a damaged file would generate black
    images and exit 0): one line naming the file and the first such tensor. One isfinite per tensor."""
    for net in ("G", "D", "G_ema"):
        state = obj.get(net)
        for name, t in state.items() if isinstance(state, dict) else ():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ProganError(f"{path}: {what} tensor {net}.{name} holds {bad} non-finite values (NaN or inf) "
                                  f"of {t.numel()}; the training diverged or the file is damaged; {fix}")


def load_stage(path: str | Path, res_px: int) -> dict:
    """The checkpoint of finished stage `res_px` (to grow from, or to resume the optimizers from)."""
    return read(path, (CHECKPOINT,), STAGE_KEYS, res_px)


def model_config(path: str | Path, model) -> ModelConfig:
    """The ModelConfig a file's "model" dict describes; fields it lacks (older files) take their defaults."""
    if not isinstance(model, dict):
        raise ProganError(f"{path}: checkpoint 'model' must be a dict of ModelConfig fields")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(model) - names:
        raise ProganError(f"{path}: checkpoint 'model' has unknown fields {sorted(set(model) - names)}")
    try:
        return ModelConfig(**model)
    except ProganError as e:
        raise ProganError(f"{path}: {e}") from None


def settings(cfg: ModelConfig, train: dict) -> dict:
    """{dotted key: value} of what must match between a stage and the checkpoint it grows from."""
    return {**{f"model.{k}": v for k, v in dataclasses.asdict(cfg).items()}, **train}


def recorded_settings(path: str | Path, ckpt: dict) -> dict:
    """`settings` as a stage checkpoint records them."""
    params = ckpt.get("params") if isinstance(ckpt.get("params"), dict) else {}
    return settings(model_config(path, ckpt["model"]), {k: params.get(k, d) for k, d in TRAIN_SWITCHES.items()})


def check_grows_from(path: str | Path, ckpt: dict, cfg: ModelConfig, params) -> None:
    """Refuse to grow from a checkpoint made with other model.* params or other feature switches: one line naming
    the first key that differs, its two values and what to do."""
    want = settings(cfg, {k: params.get(k) for k in TRAIN_SWITCHES})
    have = recorded_settings(path, ckpt)
    changed = [k for k in want if have.get(k) != want[k]]
    if changed:
        k = changed[0]
        more = f" (and {', '.join(changed[1:])})" if len(changed) > 1 else ""
        raise ProganError(f"{path}: made with {k} {_yaml(have.get(k))}, params.yaml has {_yaml(want[k])}{more}; a stage "
                          f"grows only from one trained with the same settings: re-run every stage from `progan train "
                          f"--res {params.start_px}`, or restore {k}")


INIT_KEYS = ("res_px", "model", "G", "D", "G_ema")


def load_init(path: str | Path, res_px: int, cfg: ModelConfig) -> dict:
    """The checkpoint `train.init_from` names (`progan import` of an official network, or a stage's), checked: it
    holds G, D and G_ema at `res_px` (train.start_px) made with the model settings `cfg` (params.yaml's model.*);
    anything else is one line naming the file, the first key that differs and what to do."""
    path = Path(path)
    fix = "point train.init_from at a checkpoint written by `progan import` or by a train stage"
    if not path.is_file():
        raise ProganError(f"train.init_from {path}: no such file; {fix}")
    obj = read(path, (CHECKPOINT,), INIT_KEYS, what="checkpoint (train.init_from)", fix=fix)
    if obj["res_px"] != res_px:
        raise ProganError(f"train.init_from {path}: holds {obj['res_px']} px networks, and training starts at "
                          f"train.start_px {res_px}; set train.start_px: {obj['res_px']} (the first stage starts from "
                          f"the file at its resolution)")
    have, want = dataclasses.asdict(model_config(path, obj["model"])), dataclasses.asdict(cfg)
    changed = [k for k in want if have[k] != want[k]]
    if changed:
        k = changed[0]
        more = f" (and {', '.join(f'model.{c}' for c in changed[1:])})" if len(changed) > 1 else ""
        raise ProganError(f"train.init_from {path}: made with model.{k} {_yaml(have[k])}, params.yaml has "
                          f"{_yaml(want[k])}{more}; fine-tuning keeps the file's networks: set model.{k}: "
                          f"{_yaml(have[k])} in params.yaml")
    return obj


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def load_snapshot(path: str | Path) -> dict | None:
    """The snapshot dict, or None when absent. A damaged snapshot is an error (it is never silently dropped)."""
    path = Path(path)
    if not path.is_file():
        return None
    return read(path, (SNAPSHOT,), SNAPSHOT_KEYS, what="snapshot",
                fix=f"delete {path.parent} to restart the stage from its beginning")


@dataclasses.dataclass(frozen=True)
class GeneratorFile:
    """G_ema of a checkpoint or an export, with what the file says about it."""
    G: Generator              # eval mode, no grads
    alpha: float              # the fade-in weight it was saved at (1.0 once a stage is fully grown or when absent)
    total_kimg: float         # images shown over all stages, in thousands (0 for an export)


def load_generator(path: str | Path, device="cpu") -> GeneratorFile:
    """G_ema of a training checkpoint (results/<R>/checkpoint.pt) or of an exported generator, on `device`."""
    path = Path(path)
    obj = read(path, (CHECKPOINT, GENERATOR), GENERATOR_KEYS, fix="re-run the train stage that writes it")
    model = obj["model"]
    try:
        G = Generator(model_config(path, model), obj["res_px"])
    except ProganError as e:
        raise ProganError(e if str(e).startswith(f"{path}: ") else f"{path}: {e}") from None
    if not isinstance(obj["G_ema"], dict):
        raise ProganError(f"{path}: checkpoint 'G_ema' is not a state dict")
    try:
        G.load_state_dict(obj["G_ema"], strict=True)
    except RuntimeError as e:
        raise ProganError(f"{path}: G_ema does not match a {obj['res_px']} px Generator with model {model} "
                          f"({str(e).strip().splitlines()[0][:160]})") from None
    alpha = obj.get("alpha", 1.0)
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ProganError(f"{path}: 'alpha' must be a number in [0, 1], got {alpha!r}; re-run the train stage")
    return GeneratorFile(G.to(device).eval().requires_grad_(False), float(alpha), float(obj.get("total_kimg", 0.0)))

"""params.yaml validation: one line naming the key and what is allowed."""
import os

import pytest
import yaml

from progan import params as params_mod
from progan.params import ParamsError

from helpers import REPO, default_params, demo_params, set_key, write_params


def _error(tmp_path, **overrides) -> str:
    path = write_params(tmp_path, **overrides)
    with pytest.raises(ParamsError) as info:
        params_mod.load(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_default_and_demo_params_are_valid():
    p = params_mod.load(REPO / "params.yaml")
    assert p.crop.size == 128 and p.resolutions == [4, 8, 16, 32, 64, 128]
    assert p.stage(64).lr == 0.001 and p.train.stages["4"].transition_kimg == 0
    params_mod.validate(demo_params(), "params.demo.yaml")


def test_demo_params_describe_themselves():
    """workflow/params.demo.yaml's header is its own (issue #16), not a copy of params.yaml's, and says what it runs."""
    def header(name):
        lines = (REPO / name).read_text().splitlines()
        return [line for line in lines[:next(i for i, x in enumerate(lines) if not x.startswith("#"))]]

    demo = header("workflow/params.demo.yaml")
    assert not set(demo) & set(header("params.yaml")) and "DEMO" in demo[0]
    d = demo_params()
    text = " ".join(demo)
    stages = d["train"]["stages"]
    total_kimg = sum(s["transition_kimg"] + s["stabilize_kimg"] for s in stages.values())
    for fact in (f"{d['data']['max_images']} images", f"at {d['crop']['size']} px",
                 f"latent {d['model']['latent_dim']}", f"fmap {d['model']['fmap_base']} / {d['model']['fmap_max']}", f"{total_kimg:g} kimg in all",
                 f"minibatch {stages['32']['batch']}", f"on {d['evaluate']['num_images']}"):
        assert fact in text, fact


def test_wrong_type_and_range(tmp_path):
    assert _error(tmp_path, train__ema_decay="high") == 'params.yaml: train.ema_decay must be number, got "high"'
    assert _error(tmp_path, train__stages__16__stabilize_kimg=-5) == \
        "params.yaml: train.stages.16.stabilize_kimg must be >= 0, got -5"
    assert "data.source must be one of" in _error(tmp_path, data__source="ftp")
    assert "train.gpus must be 'auto' or an integer >= 0" in _error(tmp_path, train__gpus="all")


def test_stage_missing_or_extra(tmp_path):
    data = default_params()
    del data["train"]["stages"]["64"]
    write_params(tmp_path, data)
    with pytest.raises(ParamsError, match="train.stages has no entry for resolution 64"):
        params_mod.load(tmp_path / "params.yaml")
    assert "above crop.size 64" in _error(tmp_path, crop__size=64)
    assert "train.stages keys must be the resolutions" in _error(tmp_path, train__stages__12={"batch": 1, "lr": 1, "transition_kimg": 0,
                                                                   "stabilize_kimg": 1})


def _schema_keys(node, prefix=""):
    keys = set()
    for name, sub in node.get("properties", {}).items():
        keys.add(prefix + name)
        if sub.get("type") == "object" and "properties" in sub:
            keys |= _schema_keys(sub, prefix + name + ".")
    return keys


def _yaml_keys(node, prefix=""):
    keys = set()
    for name, sub in node.items():
        keys.add(prefix + name)
        if isinstance(sub, dict) and name != "stages":
            keys |= _yaml_keys(sub, prefix + name + ".")
    return keys


def test_schema_mirrors_params_yaml_and_everything_is_required():
    schema = params_mod.schema()
    assert _schema_keys(schema) == _yaml_keys(default_params()) == _yaml_keys(demo_params())

    def walk(node, where):
        if node.get("type") == "object" and "properties" in node:
            assert set(node["required"]) == set(node["properties"]), where
            assert node.get("additionalProperties") is False, where
            for name, sub in node["properties"].items():
                walk(sub, f"{where}.{name}")

    walk(schema, "params")
    # the copy Snakemake users see is the same file
    assert (REPO / "workflow/schemas/params.schema.yaml").read_text() == \
        (REPO / "src/progan/schemas/params.schema.yaml").read_text()


def test_read_only_and_digest(tmp_path):
    p = params_mod.load(write_params(tmp_path))
    with pytest.raises(AttributeError):
        p.seed = 3
    q = params_mod.load(write_params(tmp_path / "b", seed=1))
    assert p.digest() != q.digest()
    assert p.get("train.stages.16.lr") == 0.001 and p.get("nope.x") is None


def test_evaluate_metrics_are_the_registry_names_and_checked_with_one_line(tmp_path):
    from progan.metrics.registry import METRICS

    node = params_mod.schema()["properties"]["evaluate"]["properties"]["metrics"]
    assert node["items"]["enum"] == list(METRICS)                     # the schema validates against the registry
    assert all(METRICS[m].inception == (m in ("fid", "kid", "is")) for m in METRICS)
    assert _error(tmp_path, evaluate__metrics=["swd", "fdi"]) == (
        'params.yaml: evaluate.metrics.1 must be one of "swd", "msssim", "fid", "kid", "is", got "fdi"')
    for bad in (["swd", "fid", "fid"], ["fid", "kid"]):
        assert _error(tmp_path, evaluate__metrics=bad).startswith(
            "params.yaml: evaluate.metrics must be a list of distinct metric names from swd, msssim, fid, kid, is, "
            "including swd"), bad
    assert _error(tmp_path, evaluate__fid__min_res_px=0) == "params.yaml: evaluate.fid.min_res_px must be >= 1, got 0"


@pytest.mark.parametrize("key, value, message", [
    ("train.gp_weight", float("nan"), "params.yaml: train.gp_weight must be a finite number, got nan"),
    ("train.stages.16.stabilize_kimg", float("inf"), "params.yaml: train.stages.16.stabilize_kimg must be a finite "
                                                      "number, got inf"),
    ("train.betas", [0.0, float("nan")], "params.yaml: train.betas[1] must be a finite number, got nan"),
    ("data.max_download_mb", float("inf"), "params.yaml: data.max_download_mb must be a finite number, got inf"),
])
def test_nan_and_inf_are_refused_when_params_load(tmp_path, key, value, message):
    assert _error(tmp_path, **{key.replace(".", "__"): value}) == message


def test_nan_written_as_yaml_is_refused(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("gp_weight: 10.0 ", "gp_weight: .nan ")
    assert "gp_weight: .nan" in text
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"^params.yaml: train.gp_weight must be a finite number, got nan$"):
        params_mod.load(tmp_path / "params.yaml")


def test_batches_checked_against_gpus_and_mbstd_groups_when_params_load(tmp_path):
    stage = {"batch": 6, "lr": 0.001, "transition_kimg": 600, "stabilize_kimg": 600}
    # one device: 6 does not split into groups of 4 (official minibatch_stddev_layer reshapes to [4, -1, ...])
    assert _error(tmp_path, train__gpus=1, train__stages__64=stage) == (
        "params.yaml: train.stages.64.batch 6 is not divisible into minibatch-stddev groups of "
        "model.mbstd_group_size 4; use a multiple of 4, or at most 4")
    assert _error(tmp_path, train__gpus=4, train__stages__64=stage) == (
        "params.yaml: train.stages.64.batch 6 must be divisible by train.gpus 4 (each GPU trains on an equal "
        "share of the minibatch)")
    assert _error(tmp_path, train__gpus=2, train__stages__64={**stage, "batch": 12}) == (
        "params.yaml: train.stages.64.batch 12 (6 per GPU) is not divisible into minibatch-stddev groups of "
        "model.mbstd_group_size 4; use a multiple of 4, or at most 4")
    # fine: a batch below the group is one group (official tf.minimum), group size 1 disables the layer,
    # and with train.gpus auto the count is known only when the stage starts
    for ok in ({"train__gpus": 1, "train__stages__64": {**stage, "batch": 3}},
               {"train__gpus": 0, "train__stages__64": stage, "model__mbstd_group_size": 1},
               {"train__gpus": "auto", "train__stages__64": stage},
               {"train__gpus": 2, "train__stages__64": {**stage, "batch": 4}}):
        params_mod.load(write_params(tmp_path, **ok))


def test_fmap_base_too_small_for_the_size_is_refused_when_params_load(tmp_path):
    assert _error(tmp_path, model__fmap_base=32) == ("params.yaml: model.fmap_base 32 gives 0 feature maps at "
                                                     "128 px (nf = fmap_base / 2^6); use at least 64")
    params_mod.load(write_params(tmp_path, model__fmap_base=64))


def test_renamed_key_says_what_to_do(tmp_path):
    data = default_params()
    data["train"]["num_workers"] = data["train"].pop("prefetch")
    write_params(tmp_path, data)
    with pytest.raises(ParamsError) as info:
        params_mod.load(tmp_path / "params.yaml")
    assert str(info.value).startswith("params.yaml: train.num_workers is now train.prefetch (minibatches one background "
                                      "thread reads ahead") and str(info.value).endswith("rename the key")


# ---------------------------------------------------------------- hostile files (issue #33; more in test_bad_input)

def test_the_checked_parser_reads_every_shipped_file_as_pyyaml_does():
    """params.parse (duplicate keys, aliases, depth checked) builds the same data as yaml.safe_load."""
    files = [REPO / "params.yaml", REPO / "workflow" / "params.demo.yaml", *sorted((REPO / "workflow" / "presets").glob("*.yaml"))]
    assert len(files) > 3
    for f in files:
        text = f.read_text()
        assert params_mod.parse(text, f.name) == yaml.safe_load(text), f


def test_merge_keys_may_be_overridden_but_keys_not_repeated():
    assert params_mod.parse("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  x: 3\n") == {"base": {"x": 1, "y": 2},
                                                                              "m": {"x": 3, "y": 2}}
    with pytest.raises(ParamsError, match=r"^params.yaml: duplicate key train.stages.8.lr \(lines 4 and 5\); "):
        params_mod.parse("train:\n  stages:\n    '8':\n      lr: 1\n      lr: 2\n")
    assert params_mod.parse("a: {'1': x, 1: y}\n") == {"a": {"1": "x", 1: "y"}}       # a string and an int


@pytest.mark.timeout(60)
def test_params_file_that_is_a_named_pipe_is_refused_not_read(tmp_path):
    fifo = tmp_path / "params.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ParamsError, match=r"params.yaml: not a regular file \(a pipe, socket or device\); pass "
                                          r"--params the path of a params.yaml file$"):
        params_mod.load(fifo)


def test_huge_values_are_cut_in_messages(tmp_path):
    """A 500 kB bad value: the one line quotes 60 characters of it."""
    path = write_params(tmp_path, crop__detector="x" * 500_000)
    with pytest.raises(ParamsError) as err:
        params_mod.load(path)
    msg = str(err.value)
    assert msg.startswith('params.yaml: crop.detector must be one of "mtcnn-torch"') and msg.endswith('xxx...')
    assert len(msg) < 300
    assert params_mod.short([1] * 10**6) == "a list" and params_mod.short("ab" * 100, 10) == '"ababab...'


def test_a_file_too_large_to_be_params_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\n" + "#" * params_mod.MAX_FILE_BYTES)
    with pytest.raises(ParamsError, match=r"params.yaml: 1,048,584 bytes, over the 1,048,576 a params file may have"):
        params_mod.load(path)

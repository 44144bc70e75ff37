"""One description of the DAG (pipeline.STAGES): dvc.yaml is generated from it and DVC reads back exactly its jobs,
both tools see the same graph, and a stale generated dvc.yaml is rewritten where it matters."""
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from progan import cli, params as params_mod, pipeline

from helpers import REPO, make_workspace, tiny_params, tool_env


def test_committed_dvc_yaml_is_generated_from_the_stage_table():
    params = params_mod.load(REPO / "params.yaml")
    assert (REPO / "dvc.yaml").read_text() == pipeline.dvc_yaml(params), \
        "dvc.yaml is stale: run `progan dvc-yaml` and commit it"


def test_every_params_key_and_source_file_exists():
    params = params_mod.load(REPO / "params.yaml")
    for job in pipeline.jobs(params):
        for key in job.params:
            assert params.get(key, KeyError) is not KeyError, (job.id, key)
        for f in job.code:
            assert (REPO / f).is_file(), (job.id, f)
    # every source file a stage runs is listed for it (shared plumbing aside): an edit re-runs the stages it changes
    listed = {f for s in pipeline.STAGES.values() for f in s.code}
    plumbing = {"__init__", "cli", "params", "params_file", "paths", "fileio", "log", "errors", "tracking",
                "mlflow_view", "pipeline/__init__", "pipeline/stage", "pipeline/placeholders", "pipeline/dvcfile",
                "gpus", "workspace", "demo", "generate", "presets", "official", "model/__init__", "data/__init__",
                "train/__init__"}
    for f in (REPO / "src/progan").rglob("*.py"):
        rel = f.relative_to(REPO).as_posix()
        name = rel.removeprefix("src/progan/").removesuffix(".py")
        assert rel in listed or name in plumbing, f"{rel}: run by which stage? list it in pipeline.STAGES"


def test_stage_params_are_per_resolution():
    params = params_mod.load(REPO / "params.yaml")
    keys16 = pipeline.job(params, "train", 16).params
    assert "train.stages.16" in keys16 and "train.stages.8" not in keys16
    assert not any(k.startswith("evaluate") for k in keys16)
    assert "report.grid_images" in keys16          # samples.png shows that many images (issue #21)
    assert {"crop.size", "train.gp_resolution", "train.max_consecutive_skips"} <= set(keys16)   # the penalty's f = size / R
    # evaluation mirrors the reals when training did (official util_scripts.py evaluate_metrics); where the
    # Inception weights are is no param of any stage (they are pinned by sha256): moving them re-runs nothing
    keys = pipeline.job(params, "evaluate", 16).params
    assert keys[-1] == "train.mirror_augment" and "evaluate.fid.num_images" in keys and "evaluate.seed" in keys
    every = ({f"evaluate.{k}" for k, v in params.evaluate.to_dict().items() if not isinstance(v, dict)}
             | {f"evaluate.fid.{k}" for k in params.evaluate.fid})
    assert {k for k in keys if k.startswith("evaluate.")} == every - {"evaluate.inception_weights",
                                                                       "evaluate.fid.cache_dir"}
    assert pipeline.job(params, "fid-stats", 32).params == ["evaluate.fid.max_reals"]


def test_placeholders():
    params = params_mod.load(REPO / "params.yaml")
    assert pipeline.job(params, "train", 4).deps == ["data/pyramid/4.npy"]                 # nothing before 4 px
    assert pipeline.job(params, "train", 8).deps == ["results/4/checkpoint.pt", "data/pyramid/8.npy"]
    report = pipeline.job(params, "report").deps
    assert report[:5] == ["results/4/eval.json", "results/4/train.json", "results/4/losses.tsv",
                          "results/4/samples.png", "results/8/eval.json"]                  # {each} grouped per stage
    assert report[-2:] == ["results/128/checkpoint.pt", "data/pyramid/128.npy"]            # {final} = crop.size
    assert [o.path for o in pipeline.output_patterns(params, "train")][:1] == ["results/{res}/checkpoint.pt"]
    assert pipeline.command("train", 16) == "progan train --res 16 --params params.yaml"
    assert pipeline.artifacts(params, "train", 16) == ["results/16/losses.tsv", "results/16/samples.png",
                                                       "results/16/train.json"]            # not the checkpoint


def test_cli_gpus_and_tracking_come_from_the_table():
    from progan import gpus, tracking

    assert gpus.GPU_COMMANDS == ("crop", "fid-stats", "train", "evaluate") and tracking.JOBS == ("train", "evaluate")
    parser = cli._parser("train")
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, stage in pipeline.STAGES.items():
        p = sub.choices[name]
        assert p.description == stage.help
        assert any(a.dest == "res" for a in p._actions) == stage.per_res, name


def _start_px_params(ws, size_px, start_px):
    """Tiny params training from start_px (the stages below it left in, as `dvc exp run -S` leaves them)."""
    stages = {str(r): {"batch": 8, "lr": 0.001, "transition_kimg": 0 if r <= start_px else 0.1, "stabilize_kimg": 0.1}
              for r in [2**k for k in range(2, size_px.bit_length())]}
    return tiny_params(ws, size_px=size_px, train__start_px=start_px, train__stages=stages)


def _dvc_workspace(tmp_path, size_px, start_px=4):
    ws = make_workspace(tmp_path / "ws")
    if (size_px, start_px) != (128, 4):
        _start_px_params(ws, size_px, start_px)
        (ws / "dvc.yaml").write_text(pipeline.dvc_yaml(params_mod.load(ws / "params.yaml")))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=ws, env=tool_env(), check=True)
    return ws, params_mod.load(ws / "params.yaml")


def test_start_px_placeholders():
    """train.start_px (official lod_initial_resolution): no train or evaluate job below it, and the first train job
    reads the pyramid level alone ({prev} dropped); the pyramid still writes every level (data does not depend on
    where training starts), the report reads the stages that exist."""
    from helpers import default_params
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        nogrowing = params_mod.load(_start_px_params(Path(d), 32, 32))
        from8 = params_mod.load(_start_px_params(Path(d) / "8", 32, 8))
    ids = [j.id for j in pipeline.jobs(nogrowing)]
    assert ids == ["download", "crop", "pyramid", "fid-stats@32", "train@32", "evaluate@32", "report"]
    assert pipeline.job(nogrowing, "train", 32).deps == ["data/pyramid/32.npy"]
    assert pipeline.job(nogrowing, "pyramid").out_paths[:4] == [f"data/pyramid/{r}.npy" for r in (4, 8, 16, 32)]
    assert pipeline.job(nogrowing, "report").deps[:4] == ["results/32/eval.json", "results/32/train.json",
                                                          "results/32/losses.tsv", "results/32/samples.png"]
    assert pipeline.edges(nogrowing) == {("download", "crop"), ("crop", "pyramid"), ("pyramid", "train@32"),
                                         ("pyramid", "evaluate@32"), ("train@32", "evaluate@32"),
                                         ("pyramid", "fid-stats@32"), ("fid-stats@32", "evaluate@32"),
                                         ("train@32", "report"), ("evaluate@32", "report"), ("pyramid", "report")}
    assert "train.start_px" in pipeline.job(nogrowing, "train", 32).params
    assert "train.stages.16" not in pipeline.job(nogrowing, "train", 32).params
    assert [j.id for j in pipeline.jobs(from8) if j.stage.name == "train"] == ["train@8", "train@16", "train@32"]
    assert pipeline.job(from8, "train", 8).deps == ["data/pyramid/8.npy"]
    assert pipeline.job(from8, "train", 16).deps == ["results/8/checkpoint.pt", "data/pyramid/16.npy"]
    doc = yaml.safe_load(pipeline.dvc_yaml(nogrowing))["stages"]
    assert doc["train"]["foreach"] == {"32": {"prev": "data/pyramid/32.npy"}}
    assert list(doc["evaluate"]["foreach"]) == list(doc["fid-stats"]["foreach"]) == ["32"]
    assert len(doc["pyramid"]["outs"]) == 5                            # 4 .. 32 and info.json
    assert default_params()["train"]["start_px"] == 4


@pytest.mark.parametrize("size_px,start_px", [(16, 4), (128, 4), (16, 16), (16, 8)])
def test_dvc_reads_back_exactly_the_jobs_of_the_table(tmp_path, monkeypatch, size_px, start_px):
    """DVC's own parser (foreach, ${key}, ${item.prev}) resolves dvc.yaml to each job's command, deps, params and
    outputs with their kinds: the template can not drift from the table."""
    from dvc.repo import Repo

    ws, params = _dvc_workspace(tmp_path, size_px, start_px)
    monkeypatch.chdir(ws)
    with Repo(str(ws)) as repo:
        read = {s.addressing: s for s in repo.index.stages}
    jobs = {j.id: j for j in pipeline.jobs(params)}
    assert set(read) == set(jobs)
    for job_id, job in jobs.items():
        s = read[job_id]
        param_deps = [d for d in s.deps if type(d).__name__ == "ParamsDependency"]
        assert s.cmd == job.cmd, job_id
        assert {str(d.def_path) for d in s.deps if d not in param_deps} == set(job.deps + job.code), job_id
        # a params dependency on the whole file has no key list: all of params.yaml (pipeline.WHOLE_PARAMS_YAML)
        assert [k for d in param_deps for k in (d.params or [pipeline.WHOLE_PARAMS_YAML])] == job.params, job_id
        kinds = {str(o.def_path): ("metrics" if o.metric else "plots" if o.plot else
                                   "plain" if o.use_cache else "uncached") for o in s.outs}
        assert kinds == {o.path: o.kind for o in job.outs}, job_id


def _snakemake_graph(ws):
    dot = subprocess.run(["snakemake", "--dag", "--cores", "1", "-d", str(ws), "-s", str(ws / "Snakefile")],
                         cwd=ws, env=tool_env(), capture_output=True, text=True, check=True).stdout
    stage_of_rule = {s.rule: s.name for s in pipeline.STAGES.values()}
    rule, res = {}, {}
    for node, label in re.findall(r'^\s*(\d+)\[label = "([^"]*)"', dot, re.M):
        parts = label.split("\\n")
        rule[node] = stage_of_rule.get(parts[0], parts[0])
        res[node] = next((p.split(": ")[1] for p in parts[1:] if p.startswith("res: ")), None)
    raw_edges = re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)
    # Snakemake's labels show only the wildcards a job does not share with its inputs' jobs
    # (dag.new_wildcards), so evaluate's `res` is its train input's.
    for a, b in raw_edges:
        if rule[b] == "evaluate" and rule[a] == "train":
            res[b] = res[a]
    names = {n: rule[n] + (f"@{res[n]}" if res[n] else "") for n in rule}
    edges = {(names[a], names[b]) for a, b in raw_edges}
    return set(names.values()) - {"all"}, {e for e in edges if "all" not in e}


def _dvc_graph(ws):
    dot = subprocess.run(["dvc", "dag", "--dot"], cwd=ws, env=tool_env(), capture_output=True, text=True,
                         check=True).stdout
    nodes = set(re.findall(r'^\s*"([^"]+)";', dot, re.M))
    edges = set(re.findall(r'^\s*"([^"]+)" -> "([^"]+)";', dot, re.M))
    return nodes, edges


@pytest.mark.parametrize("size_px,start_px", [(16, 4), (128, 4), (16, 16), (16, 8)])
def test_snakemake_and_dvc_report_the_same_graph(tmp_path, size_px, start_px):
    ws, params = _dvc_workspace(tmp_path, size_px, start_px)
    smk_nodes, smk_edges = _snakemake_graph(ws)
    dvc_nodes, dvc_edges = _dvc_graph(ws)
    expected_nodes = {j.id for j in pipeline.jobs(params)}
    assert smk_nodes == dvc_nodes == expected_nodes
    assert smk_edges == dvc_edges == pipeline.edges(params)
    trains = {n for n in expected_nodes if n.startswith("train@")}
    assert trains == {f"train@{r}" for r in params.resolutions} and min(params.resolutions) == start_px
    if start_px > 4:                                    # what each front end plans to run: nothing below start_px
        plan = subprocess.run(["snakemake", "-n", "--cores", "1", "-d", str(ws), "-s", str(ws / "Snakefile")],
                              cwd=ws, env=tool_env(), capture_output=True, text=True, check=True).stdout
        counts = dict(re.findall(r"^(\w+)\s+(\d+)$", plan, re.M))
        assert counts["train"] == counts["evaluate"] == str(len(params.resolutions)), plan
        listed = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=ws, env=tool_env(), capture_output=True,
                                text=True, check=True).stdout.split()
        assert set(listed) == expected_nodes and f"train@{start_px // 2}" not in listed


# ---- a stale generated dvc.yaml ---------------------------------------------------------------------------------

def _stale_workspace(tmp_path):
    """A checkout whose dvc.yaml was generated for crop.size 32, after the user edited params.yaml to 16."""
    ws = make_workspace(tmp_path / "ws")
    tiny_params(ws, size_px=32)
    (ws / "dvc.yaml").write_text(pipeline.dvc_yaml(params_mod.load(ws / "params.yaml")))
    tiny_params(ws, size_px=16)
    return ws, params_mod.load(ws / "params.yaml")


def test_snakemake_rewrites_a_stale_dvc_yaml(tmp_path):
    ws, params = _stale_workspace(tmp_path)
    out = subprocess.run(["snakemake", "-n", "--cores", "1", "-d", str(ws), "-s", str(ws / "Snakefile")], cwd=ws,
                         env=tool_env(), capture_output=True, text=True, check=True)
    assert (ws / "dvc.yaml").read_text() == pipeline.dvc_yaml(params)
    assert "dvc.yaml did not match params.yaml (crop.size 16, train.start_px 4: stages 4, 8, 16): rewrote it" in out.stderr


def test_stage_commands_rewrite_a_stale_dvc_yaml_and_stop_under_dvc(tmp_path, monkeypatch, capsys):
    """By hand a stage command rewrites dvc.yaml and goes on; under DVC (DVC_STAGE set) it stops at once with one
    line, before any work: DVC planned this run from the old file."""
    ws, params = _stale_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)                                                  # the CLI changes into ws
    stale = (ws / "dvc.yaml").read_text()
    monkeypatch.setenv("DVC_STAGE", "download")
    assert cli.main(["download", "--params", str(ws / "params.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("progan download: error: dvc.yaml did not match params.yaml (its stages follow crop.size, "
                       "train.start_px, evaluate.metrics, evaluate.fid.min_res_px) and DVC had planned this run from "
                       "the old one; it is rewritten now: run the same dvc command again")
    assert (ws / "dvc.yaml").read_text() == pipeline.dvc_yaml(params) and not (ws / "data").exists()
    (ws / "dvc.yaml").write_text(stale)
    monkeypatch.delenv("DVC_STAGE")
    assert cli.main(["download", "--params", str(ws / "params.yaml")]) == 0      # by hand: rewritten, and it runs
    assert (ws / "dvc.yaml").read_text() == pipeline.dvc_yaml(params) and (ws / "data/raw/images.tsv").is_file()
    mine = "stages: {}\n"                                                        # taken over by hand: left alone
    (ws / "dvc.yaml").write_text(mine)
    assert not pipeline.sync_dvc_yaml(params) and (ws / "dvc.yaml").read_text() == mine
    os.remove(ws / "dvc.yaml")                                                   # none at all: none is made
    assert not pipeline.sync_dvc_yaml(params) and not (ws / "dvc.yaml").exists()


def test_the_dvc_template_is_plain_yaml():
    doc = yaml.safe_load(pipeline.dvc_yaml(params_mod.load(REPO / "params.yaml")))
    train = doc["stages"]["train"]
    assert train["foreach"]["4"] == {"prev": "data/pyramid/4.npy"} and train["foreach"]["8"] == {
        "prev": "results/4/checkpoint.pt"}
    assert train["do"]["deps"][:2] == ["${item.prev}", "data/pyramid/${key}.npy"]
    assert list(doc["stages"]["evaluate"]["foreach"]) == ["4", "8", "16", "32", "64", "128"]
    assert doc["stages"]["report"]["params"] == [{"params.yaml": None}]


def test_the_fid_stats_stage(tmp_path):
    """Issue #14's `fid-stats@<R>` is one entry of the table: a GPU job per resolution >= evaluate.fid.min_res_px
    (none when evaluate.metrics has no fid, kid or is), reading the pyramid level; evaluate@R depends on its file
    there and only there; dvc.yaml, the CLI command with --res and the GPU request follow."""
    from progan import gpus, paths

    params = params_mod.load(REPO / "params.yaml")
    assert [j.id for j in pipeline.jobs(params) if j.stage.name == "fid-stats"] == [
        "fid-stats@32", "fid-stats@64", "fid-stats@128"]
    stats = pipeline.job(params, "fid-stats", 64)
    assert stats.deps == [paths.pyramid_level(64)] and stats.out_paths == ["data/fid-stats/64.npz"]
    assert stats.outs[0].kind == "uncached" and stats.cmd == "progan fid-stats --res 64 --params params.yaml"
    assert paths.fid_stats(16) not in pipeline.job(params, "evaluate", 16).deps
    assert pipeline.job(params, "evaluate", 32).deps[-2:] == [paths.PYRAMID_INFO, paths.fid_stats(32)]
    edges = pipeline.edges(params)
    assert {("pyramid", "fid-stats@32"), ("fid-stats@32", "evaluate@32")} <= edges
    assert not {e for e in edges if e[0].startswith("fid-stats") and e[1] != e[0].replace("fid-stats", "evaluate")}
    with pytest.raises(ValueError, match="no job at 16 px"):
        pipeline.job(params, "fid-stats", 16)
    doc = yaml.safe_load(pipeline.dvc_yaml(params))["stages"]
    assert doc["fid-stats"]["foreach"] == ["32", "64", "128"]
    assert doc["fid-stats"]["do"]["outs"] == [{"data/fid-stats/${item}.npz": {"cache": False}}]
    assert doc["evaluate"]["foreach"]["16"] == {"fid_stats": "results/16/checkpoint.pt"}    # no file below 32 px
    assert doc["evaluate"]["foreach"]["32"] == {"fid_stats": "data/fid-stats/32.npz"}
    assert "${item.fid_stats}" in doc["evaluate"]["do"]["deps"]
    sub = next(a for a in cli._parser()._actions if a.dest == "command")
    assert any(a.dest == "res" for a in sub.choices["fid-stats"]._actions)
    assert gpus.requested("fid-stats", params, None, 1) == 1 and pipeline.STAGES["fid-stats"].rule == "fid_stats"
    # the keys that decide which jobs there are: DAG_SHAPE_KEYS (a change rewrites dvc.yaml) are all `at` reads
    recording = params.recording()
    for st in pipeline.STAGES.values():
        if st.per_res:
            st.resolutions(recording)
    assert recording.reads == set(pipeline.DAG_SHAPE_KEYS)
    for overrides, expected in [(dict(size_px=16), []), (dict(size_px=32, evaluate__fid__min_res_px=8), [8, 16, 32]),
                                (dict(size_px=64, evaluate__metrics=["swd", "msssim"]), []),
                                (dict(size_px=64, evaluate__metrics=["swd", "is"]), [32, 64])]:
        p = params_mod.load(tiny_params(tmp_path / str(len(expected)) / str(overrides.get("size_px")), **overrides))
        assert [j.res for j in pipeline.jobs(p) if j.stage.name == "fid-stats"] == expected, overrides
        assert ("fid-stats" in yaml.safe_load(pipeline.dvc_yaml(p))["stages"]) == bool(expected)
        assert all(paths.fid_stats(r) in pipeline.job(p, "evaluate", r).deps for r in expected)


def test_a_dag_shape_key_rewrites_dvc_yaml(tmp_path, caplog):
    """evaluate.fid.min_res_px decides which fid-stats jobs there are: editing it rewrites a generated dvc.yaml,
    as editing crop.size does, and the line says what the DAG is now."""
    import logging

    path = tiny_params(tmp_path, size_px=32)
    (tmp_path / "dvc.yaml").write_text(pipeline.dvc_yaml(params_mod.load(path)))
    tiny_params(tmp_path, size_px=32, evaluate__fid__min_res_px=16)
    params = params_mod.load(path)
    with caplog.at_level(logging.INFO, logger="progan"):
        assert pipeline.sync_dvc_yaml(params)
    assert (tmp_path / "dvc.yaml").read_text() == pipeline.dvc_yaml(params)
    assert ("dvc.yaml did not match params.yaml (crop.size 32, train.start_px 4: stages 4, 8, 16, 32; fid-stats at 16, "
            "32): rewrote it") \
        in caplog.text


def test_the_inception_metrics_are_the_registrys():
    from progan.metrics import real_stats
    from progan.metrics.registry import METRICS

    assert pipeline.INCEPTION_METRICS == real_stats.INCEPTION_METRICS == tuple(m for m, v in METRICS.items()
                                                                                if v.inception)

"""One description of the DAG: dvc.yaml is generated from the stage table, and both tools see the same graph."""
import re
import subprocess

import pytest

from progan import params as params_mod, pipeline

from helpers import REPO, make_workspace, tiny_params, tool_env


def test_committed_dvc_yaml_is_generated_from_the_stage_table():
    params = params_mod.load(REPO / "params.yaml")
    assert (REPO / "dvc.yaml").read_text() == pipeline.dvc_yaml(params), \
        "dvc.yaml is stale: run `progan dvc-yaml` and commit it"


def test_every_params_key_and_source_file_exists():
    params = params_mod.load(REPO / "params.yaml")
    for job in pipeline.stages(params):
        for key in job.params:
            assert params.get(key, KeyError) is not KeyError, (job.id, key)
        for f in job.code:
            assert (REPO / f).is_file(), (job.id, f)


def test_stage_params_are_per_resolution():
    params = params_mod.load(REPO / "params.yaml")
    keys16 = pipeline.stage(params, "train", 16).params
    assert "train.stages.16" in keys16 and "train.stages.8" not in keys16
    assert not any(k.startswith("evaluate") for k in keys16)
    assert {"crop.size", "train.gp_resolution", "train.max_consecutive_skips"} <= set(keys16)   # the penalty's f = size / R
    # evaluation mirrors the reals when training did (official util_scripts.py evaluate_metrics)
    assert pipeline.stage(params, "evaluate", 16).params == ["evaluate", "train.mirror_augment"]


def _snakemake_graph(ws):
    dot = subprocess.run(["snakemake", "--dag", "--cores", "1", "-d", str(ws), "-s", str(ws / "Snakefile")],
                         cwd=ws, env=tool_env(), capture_output=True, text=True, check=True).stdout
    rule, res = {}, {}
    for node, label in re.findall(r'^\s*(\d+)\[label = "([^"]*)"', dot, re.M):
        parts = label.split("\\n")
        rule[node] = parts[0]
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
    env = tool_env()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=ws, env=env, check=True)
    dot = subprocess.run(["dvc", "dag", "--dot"], cwd=ws, env=env, capture_output=True, text=True, check=True).stdout
    nodes = set(re.findall(r'^\s*"([^"]+)";', dot, re.M))
    edges = set(re.findall(r'^\s*"([^"]+)" -> "([^"]+)";', dot, re.M))
    return nodes, edges


@pytest.mark.parametrize("size_px", [16, 128])
def test_snakemake_and_dvc_report_the_same_graph(tmp_path, size_px):
    ws = make_workspace(tmp_path / "ws")
    if size_px != 128:
        tiny_params(ws, size_px=size_px)
        params = params_mod.load(ws / "params.yaml")
        (ws / "dvc.yaml").write_text(pipeline.dvc_yaml(params))
    params = params_mod.load(ws / "params.yaml")
    smk_nodes, smk_edges = _snakemake_graph(ws)
    dvc_nodes, dvc_edges = _dvc_graph(ws)
    expected_nodes = {j.id for j in pipeline.stages(params)}
    assert smk_nodes == dvc_nodes == expected_nodes
    assert smk_edges == dvc_edges == pipeline.edges(params)

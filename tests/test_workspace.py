"""Snakemake and DVC never run on the same workspace at once: the second refuses with a message."""
import subprocess
import time

from progan import cli, workspace

from helpers import make_workspace, tiny_params, tool_env


def test_stage_command_refuses_while_snakemake_holds_the_workspace(tmp_path, monkeypatch, capsys):
    tiny_params(tmp_path)
    (tmp_path / ".snakemake" / "locks").mkdir(parents=True)
    (tmp_path / ".snakemake" / "locks" / "0.input.lock").write_text("data/raw/images.tsv\n")
    monkeypatch.delenv(workspace.DRIVER_ENV, raising=False)
    assert cli.main(["pyramid", "--params", str(tmp_path / "params.yaml")]) == 1
    assert "Snakemake is running on this workspace" in capsys.readouterr().err
    # the jobs of that Snakemake run carry PROGAN_DRIVER=snakemake and pass (then fail later: no crops yet)
    monkeypatch.setenv(workspace.DRIVER_ENV, "snakemake")
    assert cli.main(["pyramid", "--params", str(tmp_path / "params.yaml")]) == 1
    assert "no face crops found" in capsys.readouterr().err


def test_snakemake_refuses_while_dvc_runs(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    tiny_params(ws)
    env = tool_env()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=ws, env=env, check=True)
    (ws / "extra").mkdir()
    (ws / "extra" / "dvc.yaml").write_text("stages:\n  slow:\n    cmd: sleep 20 && echo done > out.txt\n"
                                           "    outs: [out.txt]\n")
    dvc = subprocess.Popen(["dvc", "repro", "extra/dvc.yaml"], cwd=ws, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while workspace.running_dvc(ws) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workspace.running_dvc(ws) is not None
        smk = subprocess.run(["snakemake", "--cores", "1", "-s", str(ws / "Snakefile"), "-d", str(ws)],
                             cwd=ws, env=env, capture_output=True, text=True, timeout=120)
        assert smk.returncode != 0
        assert "DVC is running on this workspace" in smk.stdout + smk.stderr
        assert not (ws / "data" / "raw" / "images.tsv").exists()  # no job ran
    finally:
        dvc.kill()
        dvc.wait()

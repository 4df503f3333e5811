import subprocess
import sys

from service.cli import main


def test_bench_samplers_prints_both_tables(capsys):
    assert (
        main(
            [
                "bench",
                "samplers",
                "--rows",
                "32",
                "--nfe",
                "2,4",
                "--samplers",
                "euler,dpmpp_2m,ddpm",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "## RMSE to the exact probability-flow endpoint" in out
    assert "| dpmpp_2m | yes |" in out and "| ddpm | no |" in out
    rmse_table = out.split("## Sliced")[0]
    assert "| ddpm |" not in rmse_table  # stochastic samplers have no path error


def test_bench_rejects_unknown_samplers(capsys):
    assert main(["bench", "samplers", "--samplers", "euler,warp"]) == 2
    assert "unknown sampler(s) ['warp']" in capsys.readouterr().err


def test_console_script_reports_bad_arguments():
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "samplers", "--nfe", "0,x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "expected comma-separated integers" in proc.stderr


def test_build_gaussian_passes_its_arguments_on(tmp_path, monkeypatch):
    """The CLI wiring only: tests/engines/test_build.py runs the real build."""
    import engines.build

    calls = []
    monkeypatch.setattr(engines.build, "build_gaussian", lambda *a: calls.append(a))
    out = tmp_path / "repo" / "tiny"
    argv = ["build", "gaussian", "--data", "/d", "--rank", "4", "--out", str(out), "--version", "2"]
    assert main(argv) == 0
    assert calls == [("/d", 4, str(out), 2)]


def test_build_gaussian_reports_missing_data_and_bad_versions(tmp_path, capsys):
    assert main(["build", "gaussian", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert main(["build", "gaussian", "--version", "0", "--out", str(tmp_path / "x")]) == 1
    assert "version must be a positive integer" in capsys.readouterr().err


def test_bench_runs_every_unguided_sampler(capsys):
    from engines.sampler_bench import BenchConfig
    from engines.samplers import INFO

    expected = {n for n, i in INFO.items() if n != "teleport" and not i.guided}
    assert set(BenchConfig().samplers) == expected and "euler_cfgpp" not in expected
    assert main(["bench", "samplers", "--rows", "8", "--nfe", "4"]) == 0
    out = capsys.readouterr().out
    for name in expected:
        assert f"| {name} | no |" in out

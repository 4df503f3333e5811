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

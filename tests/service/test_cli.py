import re
import subprocess
import sys

import pytest
import yaml

from service.cli import build_parser, main
from service.security import KeyStore


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


@pytest.mark.usefixtures("one_torch_thread")
def test_build_model_builds_and_checks_the_onnx_export(tmp_path, capsys):
    argv = ["build", "fashion-cd", "--runtime", "onnxruntime", "--cache", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert re.search(r"fashion-cd@\d+: onnxruntime fp32 on cpu", captured.out)
    assert "(within 0.0001)" in captured.out and "[1/3] exporting" in captured.err
    assert main(argv) == 0  # the second build reuses the cached artifact
    assert "onnx artifact up to date" in capsys.readouterr().err


def test_build_model_reports_what_cannot_be_built(tmp_path, capsys):
    assert main(["build", "fashion-nope", "--cache", str(tmp_path)]) == 1
    assert "no model 'fashion-nope'" in capsys.readouterr().err
    assert main(["build", "fashion-cd", "--runtime", "tensorrt", "--cache", str(tmp_path)]) == 1
    assert "tensorrt Python package not installed" in capsys.readouterr().err


def test_bench_engines_measures_torch_and_onnxruntime_side_by_side(tmp_path, capsys):
    argv = ["bench", "engines", "fashion-cd", "--quick", "--batches", "1,2"]
    assert main([*argv, "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| runtime | batch | samples x NFE / s | p50 ms | p99 ms | vs torch eager |" in out
    for row in ("| torch fp32 | 1 |", "| onnxruntime fp32 | 1 |", "| onnxruntime fp32 | 2 |"):
        assert row in out
    assert out.count("| 1.00x | 0.0e+00 |") == 2  # torch eager is the baseline


def test_bench_engines_on_cuda_needs_no_service_packages():
    """The GPU box has torch, numpy, safetensors, PyYAML, onnx, onnxruntime and nothing else
    of fewstep's: the engine bench must not import the service's packages."""
    code = (
        "import sys\n"
        "from service.cli import main\n"
        "rc = main(['bench', 'engines', 'fashion-cd', '--device', 'cuda', '--quick'])\n"
        "service = {'fastapi', 'pydantic', 'pydantic_settings', 'uvicorn', 'scipy',\n"
        "           'prometheus_client', 'redis', 'grpc', 'httpx', 'starlette'}\n"
        "print(rc, sorted(service & {m.split('.')[0] for m in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    rc, imported = proc.stdout.split(" ", 1)
    assert imported.strip() == "[]", proc.stdout
    import torch

    if not torch.cuda.is_available():
        assert rc == "2" and "sees no GPU" in proc.stderr


def test_keys_command_makes_a_key_whose_hash_serve_accepts(tmp_path):
    run = [sys.executable, "-m", "service.cli", "keys"]
    made = subprocess.run([*run, "new", "alice"], capture_output=True, text=True, check=True)
    key = made.stderr.split("give it to the client): ")[1].strip()
    entry = yaml.safe_load(made.stdout)["keys"][0]
    assert entry["name"] == "alice" and key not in made.stdout
    hashed = subprocess.run([*run, "hash"], input=key + "\n", capture_output=True, text=True)
    assert hashed.stdout.strip() == entry["sha256"]
    path = tmp_path / "keys.yaml"
    path.write_text(made.stdout)
    store = KeyStore.from_settings([], path)
    assert store.authenticate(f"Bearer {key}").name == "alice"


def test_serve_takes_repeated_api_keys_and_refuses_a_bad_key_file(tmp_path):
    args = build_parser().parse_args(["serve", "--api-key", "k" * 10, "--api-key", "j" * 10])
    assert args.api_key == ["k" * 10, "j" * 10]
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys: [{name: bob, sha256: nothex}]\n")
    run = [sys.executable, "-m", "service.cli", "serve", "--api-key-file", str(bad)]
    refused = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "sha256 must be 64 lower-case hex" in refused.stderr


def test_serve_refuses_an_unknown_runtime_or_an_unreadable_latency_curve(tmp_path, capsys):
    """One line and exit 2 at start-up, not a silent fallback or a traceback later."""
    from service.cli import main

    bad = tmp_path / "curve.yaml"
    bad.write_text("seconds: [\n")
    negative = tmp_path / "negative.yaml"
    negative.write_text("seconds: {1: -0.5}\n")
    cases = [
        (["--runtime", "warp"], "runtime must be one of"),
        (["--runtime", "simulated", "--latency-curve", str(tmp_path / "none")], "cannot be read"),
        (["--runtime", "simulated", "--latency-curve", str(bad)], "not valid YAML or JSON"),
        (["--runtime", "simulated", "--latency-curve", str(negative)], "positive seconds"),
    ]
    for args, message in cases:
        assert main(["serve", "--port", "0", *args]) == 2
        assert message in capsys.readouterr().err


def test_build_int8_needs_a_gate_of_at_least_10_samples(capsys, tmp_path):
    argv = ["build", "fashion-edm", "--runtime", "onnxruntime-int8", "--gate-n", "5"]
    assert main([*argv, "--cache", str(tmp_path)]) == 2
    assert "--gate-n must be at least 10 samples, got 5" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was built

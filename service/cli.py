"""The `fewstep` command line: serve, bench, build, train, eval."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _bench_samplers(args: argparse.Namespace) -> int:
    from engines import sampler_bench
    from engines.samplers import INFO

    names = tuple(args.samplers.split(",")) if args.samplers else None
    if names:
        usable = {n for n, info in INFO.items() if n != "teleport" and not info.guided}
        unknown = sorted(set(names) - usable)
        if unknown:
            print(
                f"fewstep: unknown sampler(s) {unknown}; choose from {sorted(usable)}",
                file=sys.stderr,
            )
            return 2
    config = sampler_bench.BenchConfig(
        dim=args.dim,
        components=args.components,
        rows=args.rows,
        seed=args.seed,
        nfes=args.nfe,
        sigma_skip=args.sigma_skip,
        **({"samplers": names} if names else {}),
    )
    cells, floor, seconds = sampler_bench.run(config)
    print(sampler_bench.report(config, cells, floor, seconds))
    return 0


def _bench_engines(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engines.repository import ModelNotFoundError, Repository, RepositoryError
    from engines.runtimes import bench as engine_bench
    from engines.runtimes.base import RuntimeUnavailable

    try:
        config = engine_bench.BenchConfig(
            model=args.model,
            source=Repository.of_folder(Path(args.model_repo or _default_repo()) / args.model),
            device=args.device,
            batches=args.batches,
            seconds=0.3 if args.quick else args.seconds,
            threads=args.threads,
            cache=Path(args.cache) if args.cache else None,
        )
        print(engine_bench.run(config))
    except (RepositoryError, ModelNotFoundError, RuntimeUnavailable, OSError) as err:
        print(f"fewstep: {err}", file=sys.stderr)
        return 2
    return 0


def _add_bench_engines(targets: argparse._SubParsersAction) -> None:
    engines = targets.add_parser(
        "engines",
        help="a model's network on every available runtime: samples x NFE per second",
    )
    engines.add_argument("model", help="a model with a network, e.g. fashion-edm")
    engines.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    engines.add_argument(
        "--batches", type=_int_list, default=(1, 8, 32, 128), help="batch sizes (1,8,32,128)"
    )
    engines.add_argument(
        "--seconds", type=float, default=2.0, help="timing per runtime and batch (default 2)"
    )
    engines.add_argument("--quick", action="store_true", help="0.3 s per runtime and batch")
    engines.add_argument(
        "--threads", type=int, default=1, help="CPU threads, torch and ONNX Runtime (default 1)"
    )
    engines.add_argument("--model-repo", default=None, help="model repository folder")
    engines.add_argument("--cache", default=None, help="build cache folder")
    engines.set_defaults(run=_bench_engines)


def _build_gaussian(args: argparse.Namespace) -> int:
    from engines.build import build_gaussian

    try:
        build_gaussian(args.data, args.rank, args.out, args.version)
    except (OSError, ValueError) as err:
        print(f"fewstep: {err}", file=sys.stderr)
        return 1
    return 0


def _build_engine(args: argparse.Namespace) -> int:
    from engines.repository import ModelNotFoundError, Repository, RepositoryError
    from engines.runtimes.base import RuntimeUnavailable
    from engines.runtimes.build import build_engine
    from engines.runtimes.export import BuildError, EngineCache

    if args.gate_n < 10:
        print(f"fewstep: --gate-n must be at least 10 samples, got {args.gate_n}", file=sys.stderr)
        return 2
    repo, cache = Repository(args.model_repo or _default_repo()), EngineCache(args.cache)
    try:
        report = build_engine(
            repo, args.target, args.runtime, args.precision, args.device, cache, args.force
        )
        print(report.text(), flush=True)
        if args.runtime == "onnxruntime-int8":  # lossy: its samples are measured too
            from engines.quality_gate import gate_int8

            print(gate_int8(repo, args.target, args.gate_n, cache=cache).text())
    except (RepositoryError, ModelNotFoundError, RuntimeUnavailable, BuildError, OSError) as err:
        print(f"fewstep: {err}", file=sys.stderr)
        return 1
    return 0


def _build(args: argparse.Namespace) -> int:
    return (_build_gaussian if args.target == "gaussian" else _build_engine)(args)


def _default_repo() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "model_repo")


def _add_build(commands: argparse._SubParsersAction) -> None:
    from engines.runtimes.base import PRECISIONS
    from engines.runtimes.select import FASTEST_FIRST

    build = commands.add_parser(
        "build",
        help="`build gaussian`: the Gaussian package into model_repo/; `build MODEL`: "
        "compile a model's network for a runtime into the engine cache, checked against torch",
    )
    build.add_argument("target", help="'gaussian', or the name of a model in the repository")
    gaussian = build.add_argument_group("build gaussian")
    gaussian.add_argument(
        "--data", default=None, help="Fashion-MNIST folder (default $FEWSTEP_FASHION_MNIST)"
    )
    gaussian.add_argument("--rank", type=int, default=128, help="eigenpairs per class (128)")
    gaussian.add_argument("--out", default="model_repo/fashion-gaussian", help="model folder")
    gaussian.add_argument("--version", type=int, default=1, help="version folder (default 1)")
    engine = build.add_argument_group("build MODEL")
    engine.add_argument(
        "--runtime", choices=[*FASTEST_FIRST, "onnxruntime-int8"], default="onnxruntime"
    )
    engine.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    engine.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    engine.add_argument("--model-repo", default=None, help="model repository folder")
    engine.add_argument(
        "--cache",
        default=None,
        help="build cache (default $FEWSTEP_ENGINE_CACHE or ~/.cache/fewstep/engines)",
    )
    engine.add_argument("--force", action="store_true", help="rebuild even if cached")
    engine.add_argument(
        "--gate-n",
        type=int,
        default=1000,
        help="onnxruntime-int8: samples per network in its quality gate (default 1000)",
    )
    build.set_defaults(run=_build)


def _settings(overrides: dict):
    """Settings for serve / worker, or None after printing why they cannot work."""
    from service import bootstrap

    try:
        return bootstrap.settings(overrides)
    except bootstrap.BootError as err:
        print(f"fewstep: {err}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    from service import bootstrap
    from service.app import create_app
    from service.drain import DrainingServer
    from service.httpserver import server_config

    settings = _settings(
        {
            "host": args.host,
            "port": args.port,
            "grpc_port": args.grpc_port,
            "grpc": False if args.no_grpc else None,
            "model_repo": args.model_repo,
            "batching": args.batching,
            "max_queue_delay_ms": args.max_queue_delay_ms,
            "queue": args.queue,
            "worker": False if args.no_worker else None,
            "api_key": args.api_key,
            "api_key_file": args.api_key_file,
            "runtime": args.runtime,
            "latency_curve": args.latency_curve,
        }
    )
    if settings is None:
        return 2
    if not settings.worker and settings.queue == "memory":
        print(
            "fewstep: --no-worker needs a queue that workers share: add --queue "
            "redis://HOST:6379/0 and run `fewstep worker` with the same queue",
            file=sys.stderr,
        )
        return 2
    bootstrap.configure_logging(args.log_level)
    app = create_app(settings)
    config = server_config(app, settings, log_level=args.log_level)
    DrainingServer(config, app, settings.drain_delay_s).run()
    return 0


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="run the HTTP service: API, in-process queue and worker in one process"
    )
    serve.add_argument("--host", default=None, help="bind address (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument(
        "--grpc-port", type=int, default=None, help="OIP v2 gRPC port (default 8001; 0: any free)"
    )
    serve.add_argument("--no-grpc", action="store_true", help="serve HTTP only")
    serve.add_argument("--model-repo", default=None, help="model repository folder")
    serve.add_argument("--batching", choices=["continuous", "static"], default=None)
    serve.add_argument(
        "--max-queue-delay-ms", type=float, default=None, help="static batching wait"
    )
    serve.add_argument(
        "--queue", default=None, help="'memory' (default) or redis://HOST:PORT/DB, shared"
    )
    serve.add_argument(
        "--no-worker", action="store_true", help="API only: `fewstep worker`s run the jobs"
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accept this API key (Authorization: Bearer KEY); repeat for more keys, each its "
        "own tenant (env FEWSTEP_API_KEY=k1,k2). None configured: no authentication",
    )
    serve.add_argument(
        "--api-key-file",
        default=None,
        help="YAML file of named, sha256-hashed keys with quotas (`fewstep keys new NAME`)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_runtime_override(serve)
    serve.set_defaults(run=_serve)


def _add_runtime_override(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runtime",
        default=None,
        help="run every model's network on this runtime instead of model.yaml's list "
        "(`simulated`: measurement only, sleeps for a GPU's forward time, outputs zeros)",
    )
    parser.add_argument(
        "--latency-curve",
        default=None,
        help="the simulated runtime's batch-latency YAML (default: H200, CUDA graphs)",
    )


def _worker(args: argparse.Namespace) -> int:
    import uvloop

    from service import bootstrap
    from service.worker.process import run_worker

    settings = _settings(
        {
            "queue": args.queue,
            "model_repo": args.model_repo,
            "models": args.models.split(",") if args.models else None,
            "batching": args.batching,
            "health_port": args.health_port,
            "runtime": args.runtime,
            "latency_curve": args.latency_curve,
        }
    )
    if settings is None:
        return 2
    if settings.queue == "memory":
        print(
            "fewstep: a worker process needs the queue the API uses: "
            "--queue redis://HOST:6379/0 (or FEWSTEP_QUEUE)",
            file=sys.stderr,
        )
        return 2
    bootstrap.configure_logging(args.log_level)
    return uvloop.run(run_worker(settings, metrics_port=args.metrics_port))


def _add_worker(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser(
        "worker",
        help="run a worker on a shared Redis queue (any number, on any machine); "
        "SIGTERM: finish the jobs in hand, then exit 0",
    )
    worker.add_argument("--queue", default=None, help="redis://HOST:PORT/DB, as the API's")
    worker.add_argument("--models", default=None, help="comma-separated names (default: all)")
    worker.add_argument("--model-repo", default=None, help="model repository folder")
    worker.add_argument("--batching", choices=["continuous", "static"], default=None)
    worker.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)"
    )
    worker.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="serve /healthz (loop heartbeat age), /readyz and /metrics here (0: off)",
    )
    worker.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    _add_runtime_override(worker)
    worker.set_defaults(run=_worker)


def _add_train_eval(commands: argparse._SubParsersAction) -> None:
    from engines import quality, tune
    from engines import quality_speech as speech_eval
    from engines.training import recipes

    recipes.add_parsers(commands)
    quality.add_parser(commands)
    tune.add_parser(commands)
    speech_eval.add_parser(commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewstep", description="Serve few-step generative models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmarks that print markdown tables")
    targets = bench.add_subparsers(dest="target", required=True)
    samplers = targets.add_parser("samplers", help="sampler error vs NFE on a Gaussian mixture")
    samplers.add_argument("--dim", type=int, default=8, help="data dimension (default 8)")
    samplers.add_argument(
        "--components", type=int, default=4, help="mixture components (default 4)"
    )
    samplers.add_argument("--rows", type=int, default=512, help="samples per cell (default 512)")
    samplers.add_argument("--seed", type=int, default=0)
    samplers.add_argument(
        "--nfe", type=_int_list, default=(1, 2, 4, 5, 8, 10, 20), help="NFE budgets, e.g. 1,2,4"
    )
    samplers.add_argument(
        "--sigma-skip", type=float, default=8.0, help="teleport target sigma (default 8)"
    )
    samplers.add_argument("--samplers", default="", help="comma-separated subset (default: all)")
    samplers.set_defaults(run=_bench_samplers)
    _add_bench_engines(targets)
    from engines import scaling_bench

    scaling_bench.add_parser(targets)
    _add_build(commands)
    _add_serve(commands)
    _add_worker(commands)
    _add_keys(commands)
    _add_train_eval(commands)
    return parser


def _keys(args: argparse.Namespace) -> int:
    from service.security import keys_command

    return keys_command(args.rest)


def _add_keys(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser(
        "keys",
        help="`keys new NAME`: make an API key and its key file entry; `keys hash`: the "
        "sha256 of a key read from stdin",
        add_help=False,
    )
    keys.add_argument("rest", nargs=argparse.REMAINDER)
    keys.set_defaults(run=_keys)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The INT8 quality gate: what quantization costs in samples, measured before it is served.

The INT8 build (engines/runtimes/quantize.py) bounds the network's error on x0; this gate
bounds what that error does to images. It samples the model at its default sampler and
steps with the fp32 network and with the INT8 candidate, from the same seeds and labels,
and measures both with the quality harness (engines/quality.py): Frechet distance to the
real test set in the classifier's features, and class accuracy. The candidate is refused
when

    FD(int8) > FD_MAX_RATIO x FD(fp32) + FD_SLACK,  or
    accuracy(int8) < accuracy(fp32) - ACCURACY_MAX_DROP.

Both runs share seeds, so most sampling noise cancels in the comparison; FD_SLACK absorbs
what is left at GATE_N samples (FD at n=1000 moves by a few hundredths between seeds).
The verdict goes into the artifact's manifest; serving loads only a passed artifact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from engines.quality import CLASSIFIER, Cell, Reference, evaluate, load_classifier
from engines.repository import Repository
from engines.runtimes.export import BuildError, EngineCache, Progress, stderr_progress
from engines.runtimes.quantize import record_gate

GATE_N = 1000  # samples per network: about a minute each on one CPU core
FD_MAX_RATIO = 1.25  # INT8 may raise FD by at most a quarter ...
FD_SLACK = 0.05  # ... plus what n=1000 cannot resolve
ACCURACY_MAX_DROP = 0.02  # two points of class accuracy


@dataclass(frozen=True)
class GateVerdict:
    """fp32 and INT8 measured side by side, and whether INT8 stays within the bounds."""

    model: str
    sampler: str
    steps: int
    n: int
    fd_fp32: float
    fd_int8: float
    accuracy_fp32: float
    accuracy_int8: float
    passed: bool
    verdict: str

    @classmethod
    def judge(cls, fp32: Cell, int8: Cell) -> GateVerdict:
        fd_bound = FD_MAX_RATIO * fp32.fd + FD_SLACK
        acc_bound = fp32.accuracy - ACCURACY_MAX_DROP
        problems = []
        if int8.fd > fd_bound:
            problems.append(f"FD {int8.fd:.3f} over the bound {fd_bound:.3f}")
        if int8.accuracy < acc_bound:
            problems.append(f"class accuracy {int8.accuracy:.3f} under the bound {acc_bound:.3f}")
        verdict = (
            "; ".join(problems)
            if problems
            else f"FD {int8.fd:.3f} <= {fd_bound:.3f}, accuracy {int8.accuracy:.3f} >= "
            f"{acc_bound:.3f}"
        )
        return cls(
            fp32.model,
            fp32.sampler,
            fp32.steps,
            fp32.n,
            fp32.fd,
            int8.fd,
            fp32.accuracy,
            int8.accuracy,
            not problems,
            verdict,
        )

    def text(self) -> str:
        return (
            f"{self.model}: INT8 quality gate, {self.sampler} {self.steps} steps, n={self.n} "
            f"(same seeds): FD {self.fd_fp32:.3f} fp32 -> {self.fd_int8:.3f} INT8, class "
            f"accuracy {self.accuracy_fp32:.3f} -> {self.accuracy_int8:.3f}: "
            f"{'passed' if self.passed else 'REFUSED'} ({self.verdict})"
        )


def gate_int8(
    repo: Repository,
    name: str,
    n: int = GATE_N,
    seed: int = 0,
    cache: EngineCache | None = None,
    classifier: str | Path = CLASSIFIER,
    reference: Reference | None = None,
    progress: Progress = stderr_progress,
) -> GateVerdict:
    """Measure a model's INT8 candidate against fp32 and record the verdict in its manifest;
    raises BuildError when it is refused (it is then never served)."""
    cache = cache or EngineCache()
    progress(f"{name}: INT8 quality gate: loading the classifier and the real test set")
    ref = reference or Reference(load_classifier(classifier))
    quiet = lambda message: None  # noqa: E731
    fp32 = repo.load(name, cache=cache, runtimes=["onnxruntime", "torch"], progress=quiet)
    int8 = repo.load(
        name, cache=cache, runtimes=["onnxruntime-int8"], progress=quiet, ungated_int8=True
    )
    if int8.runtime != "onnxruntime-int8":
        reasons = "; ".join(r for _, r in int8.engine.skipped) if int8.engine else ""
        raise BuildError(f"{name}: the INT8 candidate did not load: {reasons}")
    sampling = fp32.spec.sampling
    cells = []
    for model in (fp32, int8):
        progress(
            f"{name}: INT8 quality gate: {n} samples on {model.runtime} "
            f"({sampling.default_sampler}, {sampling.default_steps} steps)"
        )
        cells.append(
            evaluate(ref, model, sampling.default_sampler, sampling.default_steps, n, seed=seed)
        )
    verdict = GateVerdict.judge(*cells)
    record_gate(int8.engine.runtime.path.parent, asdict(verdict))
    if not verdict.passed:
        raise BuildError(verdict.text() + "; INT8 is not served")
    return verdict

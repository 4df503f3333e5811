"""Verifiers: score generated samples, higher is better, for inference-time scaling.

A verifier looks at samples in data space (decoded, for latent models; values in the
model's data_range) and the class each was asked for, and returns one score per row. The
worker uses it to pick the best of several candidates (`best_of`) and to weight particles
on their x0 predictions (`steering`, engines.scaling). Which verifier a model uses is its
model.yaml's `verifier:` section (engines.repository.model_yaml); `VERIFIERS` maps the
names there to loaders, so a new verifier is one function here, registered by name.

The first: the shipped Fashion-MNIST classifier's log-probability of the requested class
(Ma et al. 2025 use classifier log-probabilities as one of their verifiers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from engines.nets import Classifier, ClassifierConfig, ConfigError, config_from_dict

CLASSIFIERS = "_classifiers"  # classifier folders live under <model root>/_classifiers/


class VerifierError(ValueError):
    """A verifier cannot be built from what model.yaml names (missing, unreadable, unfit)."""


class Verifier(Protocol):
    """Scores samples: higher is better."""

    name: str
    needs_labels: bool  # scores depend on the class asked for (a conditional model only)

    def score(self, x0: Tensor, labels: Tensor | None) -> Tensor:
        """Per-row float32 scores [B] of samples x0 [B, C, H, W] in data space."""
        ...


@dataclass(frozen=True)
class VerifierConfig:
    """model.yaml's `verifier:` section, checked (see model_yaml._parse_verifier)."""

    name: str  # a key of VERIFIERS
    classifier: str = "fashion-cnn"  # name "classifier": the folder under _classifiers/
    version: int = 1  # of that classifier
    max_candidates: int = 8  # the largest best_of / steering.particles a request may ask
    potential_scale: float = 1.0  # steering's lambda: weights exp(lambda * score)


class ClassifierVerifier:
    """log p(requested class | x) of a classifier trained on the model's data."""

    needs_labels = True

    def __init__(self, classifier: Classifier, data_range: tuple[float, float], name: str):
        self.classifier, self.data_range, self.name = classifier, data_range, name
        self.modules = (classifier,)  # moved with the model (LoadedModel.to)

    @torch.inference_mode()
    def score(self, x0: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            raise VerifierError(f"verifier {self.name} scores a requested class; pass labels")
        lo, hi = self.data_range
        device = next(self.classifier.parameters()).device
        pixels = ((x0.float() - lo) / (hi - lo) * 2 - 1).clamp(-1, 1).to(device)
        logp = torch.log_softmax(self.classifier(pixels).float(), dim=1)
        return logp.gather(1, labels.to(device).long().view(-1, 1)).view(-1).cpu()


def load_classifier(folder: Path, version: int, labels: tuple[str, ...]) -> Classifier:
    """A classifier folder (classifier.yaml + <version>/weights.safetensors) whose classes
    are `labels`, in order."""
    path = folder / "classifier.yaml"
    rebuild = f"train it with `fewstep train classifier --out {folder}`"
    try:
        meta = yaml.safe_load(path.read_text())
        config = config_from_dict(ClassifierConfig, meta["network"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ConfigError) as err:
        raise VerifierError(
            f"{path}: not a readable classifier description ({err}); {rebuild}"
        ) from None
    if list(meta.get("labels", [])) != list(labels):
        raise VerifierError(
            f"{path}: classes {meta.get('labels')} do not match the model's labels "
            f"{list(labels)}; a classifier verifier must know the model's classes in order"
        )
    model = Classifier(config)
    weights = folder / str(version) / "weights.safetensors"
    try:
        model.load_state_dict(load_file(str(weights)))
    except (OSError, RuntimeError, SafetensorError) as err:
        first = str(err).splitlines()[0]
        raise VerifierError(
            f"{weights}: unreadable classifier weights ({first}); {rebuild}"
        ) from None
    return model.eval().requires_grad_(False)


def _classifier(config: VerifierConfig, root: Path, spec) -> Verifier:
    if not spec.labels:
        raise VerifierError("verifier 'classifier' needs a class-conditional model (labels)")
    folder = root / CLASSIFIERS / config.classifier
    clf = load_classifier(folder, config.version, spec.labels)
    return ClassifierVerifier(clf, spec.data_range, f"classifier:{config.classifier}")


# name -> loader(config, the model repository's root folder, the model's spec)
VERIFIERS: dict[str, Callable[[VerifierConfig, Path, object], Verifier]] = {
    "classifier": _classifier,
}


def load_verifier(config: VerifierConfig, root: Path, spec) -> Verifier:
    """The verifier a model's `verifier:` section names; VerifierError says what is wrong."""
    if config.name not in VERIFIERS:
        raise VerifierError(f"unknown verifier {config.name!r}; use one of {sorted(VERIFIERS)}")
    return VERIFIERS[config.name](config, root, spec)

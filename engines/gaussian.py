"""Gaussian score approximation and analytical teleportation (Wang & Vastola, TMLR 2024).

For data N(mu, Sigma) with Sigma = U diag(lam) U^T (top-k eigenpairs; the complement has
variance 0) the EDM denoiser and the probability-flow ODE have closed forms:

    D(x; sigma) = mu + U diag(lam / (lam + sigma^2)) U^T (x - mu)
    x(sigma)    = mu + U diag(sqrt((sigma^2 + lam) / (sigma_T^2 + lam))) U^T (x_T - mu)
                     + (sigma / sigma_T) (I - U U^T)(x_T - mu)

Early in sampling the learned score of a real model is close to this Gaussian one, so the
first steps can be replaced by one exact jump. Statistics may be per class.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from engines.denoisers import Cond


@dataclass
class GaussianStats:
    """Mean and top eigenpairs of the covariance of a data set, one set per class.

    mean: [K, D]; eigvals: [K, r] (descending); eigvecs: [K, D, r]; shape: one sample's
    shape (D = prod(shape)). K = 1 for unconditional data.
    """

    mean: Tensor
    eigvals: Tensor
    eigvecs: Tensor
    shape: tuple[int, ...]
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        k, d = self.mean.shape
        if self.eigvals.shape[0] != k or self.eigvecs.shape[:2] != (k, d):
            raise ValueError("mean [K, D], eigvals [K, r] and eigvecs [K, D, r] disagree")
        if int(torch.tensor(self.shape).prod()) != d:
            raise ValueError(f"shape {self.shape} does not hold {d} values")
        if self.labels and len(self.labels) != k:
            raise ValueError(f"{len(self.labels)} labels for {k} classes")

    @property
    def classes(self) -> int:
        return self.mean.shape[0]

    @classmethod
    def fit(
        cls,
        data: Tensor,
        labels: Tensor | None = None,
        rank: int | None = None,
        class_names: Sequence[str] = (),
    ) -> GaussianStats:
        """Estimate per-class mean and top-`rank` covariance eigenpairs (float64)."""
        flat = data.reshape(len(data), -1).to(torch.float64)
        groups = (
            [flat] if labels is None else [flat[labels == c] for c in labels.unique().sort()[0]]
        )
        if any(len(rows) < 2 for rows in groups):
            raise ValueError("every class needs at least 2 samples to estimate a covariance")
        means = torch.stack([rows.mean(0) for rows in groups])
        covs = torch.stack([torch.cov(rows.T) for rows in groups])
        return cls.from_moments(means, covs, tuple(data.shape[1:]), rank, class_names)

    @classmethod
    def from_moments(
        cls,
        means: Tensor,
        covs: Tensor,
        shape: tuple[int, ...],
        rank: int | None = None,
        class_names: Sequence[str] = (),
    ) -> GaussianStats:
        """Keep the top-`rank` eigenpairs of each class covariance (all of them by default)."""
        lam, u = torch.linalg.eigh(covs.to(torch.float64))
        rank = lam.shape[1] if rank is None else rank
        lam, u = lam.flip(1)[:, :rank].clamp(min=0), u.flip(2)[:, :, :rank]
        return cls(
            means.to(torch.float64),
            lam.contiguous(),
            u.contiguous(),
            tuple(shape),
            tuple(class_names),
        )

    def _cast(self, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor]:
        """Statistics in the compute dtype and device, converted once and cached."""
        key = (dtype, str(device))
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = tuple(
                t.to(dtype=dtype, device=device) for t in (self.mean, self.eigvals, self.eigvecs)
            )
        return cache[key]

    def _per_class(self, x: Tensor, labels: Tensor | None, sigma2: Tensor | None, scale) -> Tensor:
        """mu + U diag(f) U^T (x - mu) + rest (I - U U^T)(x - mu) for each row's class.

        f, rest = scale(lam, sigma2) with lam [K, 1, r] and sigma2 (per-row sigma^2 laid
        out like the rows, [K, M, 1]) or None. Rows are grouped by class into a padded
        [K, M, D] block so a pass costs two batched matmuls however many classes it holds.
        Computed in x's dtype: float64 stays exact, float32 serves fast.
        """
        idx = torch.zeros(len(x), dtype=torch.long) if labels is None else labels.long().cpu()
        if len(idx) and (idx.min() < 0 or idx.max() >= self.classes):
            raise ValueError(f"labels must lie in 0..{self.classes - 1}, got {idx.tolist()}")
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        means, eigvals, eigvecs = self._cast(dtype, x.device)
        flat = x.reshape(len(x), -1).to(dtype)
        classes, slot, counts = idx.unique(return_inverse=True, return_counts=True)
        if len(classes) == 1:  # one class: the rows already are the block
            slot = pos = slice(None)
            block = flat[None]
        else:
            order = torch.argsort(slot, stable=True)
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.empty_like(order)
            pos[order] = torch.arange(len(order)) - starts[slot[order]]
            slot, pos = slot.to(x.device), pos.to(x.device)
            block = flat.new_zeros(len(classes), int(counts.max()), flat.shape[1])
            block[slot, pos] = flat
        mu = means[classes.to(x.device)][:, None, :]
        u = eigvecs[classes.to(x.device)]
        diff = block - mu
        coeff = torch.bmm(diff, u)
        if sigma2 is not None:
            padded = sigma2.new_ones(block.shape[0], block.shape[1], 1)
            padded[slot, pos] = sigma2.reshape(-1, 1)
            sigma2 = padded
        factor, rest = scale(eigvals[classes.to(x.device)][:, None, :], sigma2)
        projected = torch.bmm(factor * coeff, u.transpose(1, 2))
        if rest:
            projected += rest * (diff - torch.bmm(coeff, u.transpose(1, 2)))
        out = (mu + projected)[0] if len(classes) == 1 else (mu + projected)[slot, pos]
        return out.reshape(x.shape).to(dtype=x.dtype)

    def denoise(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """Closed-form posterior mean E[x0 | x] under the Gaussian, per-row sigma [B]."""
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        sigma2 = sigma.to(device=x.device, dtype=dtype) ** 2
        return self._per_class(x, labels, sigma2, lambda lam, s2: (lam / (lam + s2), 0.0))

    def flow(
        self, x: Tensor, sigma_from: float, sigma_to: float, labels: Tensor | None = None
    ) -> Tensor:
        """Exact probability-flow ODE solution from sigma_from to sigma_to (teleportation)."""
        ratio = sigma_to / sigma_from

        def along(lam, _):
            return torch.sqrt((sigma_to**2 + lam) / (sigma_from**2 + lam)), ratio

        return self._per_class(x, labels, None, along)

    def denoiser(self):
        """This Gaussian as a denoiser D(x, sigma, cond) (class from cond['label'])."""

        def gaussian_denoiser(x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
            labels = None if cond is None or self.classes == 1 else cond.get("label")
            if self.classes > 1 and labels is None:
                raise ValueError("these statistics are per class: pass cond['label']")
            return self.denoise(x, sigma, labels)

        return gaussian_denoiser

    def save(self, path: str | Path) -> None:
        tensors = {"mean": self.mean, "eigvals": self.eigvals, "eigvecs": self.eigvecs}
        meta = {"shape": json.dumps(list(self.shape)), "labels": json.dumps(list(self.labels))}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> GaussianStats:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        t = load_file(str(path))
        return cls(
            t["mean"].to(torch.float64),
            t["eigvals"].to(torch.float64),
            t["eigvecs"].to(torch.float64),
            tuple(json.loads(meta.get("shape", "[]"))),
            tuple(json.loads(meta.get("labels", "[]"))),
        )

"""Vector quantisers for the shared 3D VQ-GAN (:mod:`common.networks.vqgan`).

Two codebooks with one interface, ``quantizer(z) -> (z_q, loss, stats)``:

- :class:`VectorQuantizer3D`: codebook learnt by gradient, the VQ-VAE loss of van den Oord et al.
  ("Neural Discrete Representation Learning", NeurIPS 2017, eq. 3) as written in the ALDM paper
  (Kim & Park, WACV 2024): ``L_VQ = ||sg[z] - e||^2 + beta ||z - sg[e]||^2`` with ``beta`` on the
  **commitment** term. Taming-transformers' ``legacy=True`` default puts ``beta`` on the codebook
  term instead; that is not reproduced here.
- :class:`EMAVectorQuantizer`: MONAI's :class:`~monai.networks.layers.vector_quantizer.EMAQuantizer`
  (EMA of cluster counts and sums, decay 0.99) extended with the two features of the TATS /
  medicaldiffusion codebook (``FirasGit/medicaldiffusion`` ``vq_gan_3d/model/codebook.py``) used by
  CLDM: a data-dependent initialisation from the first training batch's encoder outputs, and a
  restart of dead entries (EMA count < ``restart_threshold``) from random encoder outputs. The loss
  is the commitment term only, ``commitment_cost * MSE(z, sg[e])``.

Shapes: ``z`` is ``(B, D, *spatial)`` with ``D = embedding_dim`` (2D or 3D spatial); ``z_q`` has the
same shape; ``stats["indices"]`` is ``(B, *spatial)`` (int64); ``stats["perplexity"]`` and
``stats["codebook_used"]`` are 0-d tensors.

Both run in float32 under autocast (distances in half precision pick wrong codes) and both expose
:meth:`codebook_mean_std` (mean and std over all codebook entries, the latent normalisation of
CLDM's ``norm_z``) and :meth:`lookup` (nearest code without any update, for decoding continuous
latents, e.g. a diffusion sample).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.networks.layers.vector_quantizer import EMAQuantizer
from torch import nn

__all__ = ["VectorQuantizer3D", "EMAVectorQuantizer", "codebook_usage"]


def _float32(device: torch.device):
    """Context that turns autocast off on devices that have one (distances need float32)."""
    return torch.autocast(device_type=device.type, enabled=False) if device.type in ("cuda", "cpu") else nullcontext()


def _flatten(z: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, D, *S) -> (B * prod(S), D), channel-last rows."""
    if z.shape[1] != dim:
        raise ValueError(f"expected {dim} latent channels, got shape {tuple(z.shape)}")
    return z.movedim(1, -1).reshape(-1, dim)


def _nearest(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean distance) for every row of ``flat``."""
    dist_sq = (flat**2).sum(1, keepdim=True) - 2.0 * flat @ codebook.t() + (codebook**2).sum(1)[None, :]
    return dist_sq.argmin(dim=1)


def codebook_usage(indices: torch.Tensor, num_embeddings: int) -> dict[str, torch.Tensor]:
    """Usage statistics of one batch of code indices.

    ``perplexity = exp(-sum_k p_k log p_k)`` with ``p_k`` the fraction of latent vectors assigned to
    entry ``k`` (1 when a single code is used, ``K`` when all are used uniformly);
    ``codebook_used`` = number of distinct entries used.
    """
    counts = torch.bincount(indices.reshape(-1), minlength=num_embeddings).float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-10))).sum()
    return {"perplexity": torch.exp(entropy), "codebook_used": (counts > 0).sum().float()}


class _CodebookMixin:
    """Shared read-only helpers; subclasses provide ``codebook`` (K, D) and ``embedding_dim``."""

    codebook: torch.Tensor
    embedding_dim: int
    num_embeddings: int

    @torch.no_grad()
    def codebook_mean_std(self) -> tuple[float, float]:
        """Mean and (unbiased) std over all entries of the codebook, as plain floats.

        NODDI-SR normalises latents with these (``z~ = (z - mean) / std``); they must be frozen and
        stored after VQ-GAN training (noddi_sr spec, pitfall 9), so they are returned as numbers.
        """
        cb = self.codebook.detach().float()
        return float(cb.mean()), float(cb.std())

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codebook vectors of ``z`` (B, D, *S) and their indices (B, *S); no update, no loss."""
        flat = _flatten(z.float(), self.embedding_dim)
        idx = _nearest(flat, self.codebook.float())
        z_q = self.codebook[idx].view(*z.shape[:1], *z.shape[2:], self.embedding_dim).movedim(-1, 1)
        return z_q.to(z.dtype), idx.view(z.shape[0], *z.shape[2:])

    def embed_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of ``indices`` (B, *S) in channel-first layout (B, D, *S)."""
        return self.codebook[indices].movedim(-1, 1)


class VectorQuantizer3D(_CodebookMixin, nn.Module):
    """Codebook learnt by gradient with a straight-through estimator (ALDM's quantiser).

    Args:
        num_embeddings: codebook size K.
        embedding_dim: latent channels D.
        beta: weight of the commitment term ``||z - sg[e]||^2`` (0.25 in the ALDM paper).

    The codebook is initialised U(-1/K, 1/K) as in taming-transformers. Both terms are means over
    all latent elements (``F.mse_loss``), so ``dL/dz = 2 beta (z - e) / N`` and the codebook gets
    gradient only from the first term.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.beta = float(beta)
        self.embedding = nn.Embedding(self.num_embeddings, self.embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.num_embeddings, 1.0 / self.num_embeddings)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        with _float32(z.device):
            zf = z.float()
            flat = _flatten(zf, self.embedding_dim)
            idx = _nearest(flat.detach(), self.codebook.detach().float())
            e = self.embedding(idx).view(*zf.shape[:1], *zf.shape[2:], self.embedding_dim).movedim(-1, 1)
            loss = F.mse_loss(e, zf.detach()) + self.beta * F.mse_loss(zf, e.detach())
            # straight-through: forward value e, gradient w.r.t. z is the identity
            z_q = zf + (e - zf).detach()
        stats = codebook_usage(idx, self.num_embeddings)
        stats["indices"] = idx.view(z.shape[0], *z.shape[2:])
        return z_q.to(z.dtype), loss, stats


class EMAVectorQuantizer(_CodebookMixin, EMAQuantizer):
    """MONAI ``EMAQuantizer`` plus data-dependent initialisation and dead-code restart (CLDM codebook).

    Args:
        num_embeddings: codebook size K (8192 in CLDM).
        embedding_dim: latent channels D (8 in CLDM).
        spatial_dims: 2 or 3.
        commitment_cost: weight of ``MSE(z, sg[e])`` (0.25).
        decay: EMA decay of counts and sums (0.99).
        epsilon: Laplace smoothing of the counts (MONAI default 1e-5).
        restart_threshold: entries whose EMA count falls below it are restarted (1.0 as in
            medicaldiffusion's ``restart_thres``); ``None`` disables restarts.
        data_init: initialise the codebook from the first training batch's encoder outputs.
        ddp_sync: all-reduce counts/sums and broadcast re-initialised entries from rank 0 so every
            process keeps the same codebook.

    One training-mode forward does, in order: (first call only) data-dependent init; nearest-code
    assignment with the current codebook; EMA update ``N <- d N + (1 - d) n``,
    ``m <- d m + (1 - d) sum z``, ``e = m / N~`` (N~ Laplace-smoothed); restart of entries with
    ``N < restart_threshold``. Loss and output use the codebook *before* the update.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        spatial_dims: int = 3,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        restart_threshold: float | None = 1.0,
        data_init: bool = True,
        ddp_sync: bool = True,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            commitment_cost=commitment_cost,
            decay=decay,
            epsilon=epsilon,
            ddp_sync=ddp_sync,
        )
        self.restart_threshold = None if restart_threshold is None else float(restart_threshold)
        self.data_init = bool(data_init)
        # saved with the checkpoint, so a resumed run does not re-initialise a trained codebook
        self.register_buffer("initialized", torch.tensor(not self.data_init))

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def _sync(self) -> bool:
        return self.ddp_sync and dist.is_available() and dist.is_initialized()

    def _random_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` random rows of ``flat``; with fewer rows than ``n`` they are repeated with a small
        jitter (std / sqrt(D) scaled by 0.01) so that repeated entries are not identical."""
        if flat.shape[0] < n:
            reps = -(-n // flat.shape[0])
            std = flat.std().clamp_min(1e-6) * 0.01 / (self.embedding_dim**0.5)
            flat = flat.repeat(reps, 1)
            flat = flat + torch.randn_like(flat) * std
        return flat[torch.randperm(flat.shape[0], device=flat.device)[:n]]

    @torch.no_grad()
    def _data_init(self, flat: torch.Tensor) -> None:
        codes = self._random_rows(flat, self.num_embeddings)
        if self._sync():
            dist.broadcast(codes, src=0)
        self.embedding.weight.data.copy_(codes)
        self.ema_w.data.copy_(codes)
        self.ema_cluster_size.data.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, onehot: torch.Tensor) -> None:
        counts = onehot.sum(0)
        sums = onehot.t() @ flat
        self.distributed_synchronization(counts, sums)
        self.ema_cluster_size.data.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_w.data.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.embedding.weight.data.copy_(self.ema_w / smoothed[:, None])

    @torch.no_grad()
    def _restart(self, flat: torch.Tensor) -> int:
        """Re-seed dead entries from random encoder outputs; returns how many were restarted."""
        if self.restart_threshold is None:
            return 0
        dead = self.ema_cluster_size < self.restart_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        new = self._random_rows(flat, self.num_embeddings)
        if self._sync():
            dist.broadcast(new, src=0)
        self.embedding.weight.data[dead] = new[dead]
        # keep the EMA sum consistent with the new vector (ema_w / smoothed count == entry), so the
        # next update moves the restarted entry from where it was put instead of resetting it
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.ema_w.data[dead] = new[dead] * smoothed[dead, None]
        return n_dead

    def forward(  # type: ignore[override]
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        with _float32(z.device):
            zf = z.float()
            flat = _flatten(zf, self.embedding_dim).detach()
            if self.training and not bool(self.initialized):
                self._data_init(flat)
            idx = _nearest(flat, self.codebook.float())
            e = self.codebook[idx].view(*zf.shape[:1], *zf.shape[2:], self.embedding_dim).movedim(-1, 1).clone()
            n_restarted = 0
            if self.training:
                self._ema_update(flat, F.one_hot(idx, self.num_embeddings).float())
                n_restarted = self._restart(flat)
            loss = self.commitment_cost * F.mse_loss(zf, e.detach())
            z_q = zf + (e - zf).detach()
        stats = codebook_usage(idx, self.num_embeddings)
        stats["indices"] = idx.view(z.shape[0], *z.shape[2:])
        stats["restarted"] = torch.tensor(float(n_restarted))
        return z_q.to(z.dtype), loss, stats

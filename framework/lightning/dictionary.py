"""Training a TopK sparse autoencoder (Gao et al., 2024, "Scaling and evaluating sparse
autoencoders") on a table of activations, as a Lightning run under the trainer config.

What follows the paper: k active latents per token (L0 = k by construction), the
pre-encoder bias tied to the decoder bias and initialised at the activations' geometric
median, the encoder initialised as the decoder's transpose (the paper's fix for most dead
latents), unit-norm decoder directions (gradients projected off them before each step and
the directions renormalised after it), Adam, and the optional AuxK loss that has the k_aux
strongest dead latents reconstruct the main model's error.

What is this module's own choice: training runs on activations divided by one scalar (their
centred RMS), so one learning rate suits any model; the scale is folded back into the saved
weights exactly (relu and topk commute with a positive scale). The loss is the batch's FVU
(MSE over the batch's variance: a scale-free number that is the reported metric). Only the k
selected pre-activations are recomputed with gradients (the others get none through topk),
and the decoder is an embedding_bag over those k atoms, so a step costs one dense encoder
matmul plus O(batch x k x d) instead of three dense matmuls.

The dictionary is a few MB: it trains in one process whatever trainer.strategy / devices
say (those shard model training); accelerator, precision, max_steps, batch_size,
gradient_clip_val, log_every_n_steps and deterministic apply.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from framework.dictionary import Dictionary
from framework.lightning.spec import TrainerSpec

log = logging.getLogger("sculpt")


@dataclass(frozen=True)
class DictionaryConfig:
    """features: dictionary size F; k: active latents per token; lr: Adam's step size;
    aux_k: dead latents the AuxK loss uses (0: no auxiliary loss); aux_coef: its weight;
    dead_after_tokens: a latent not active on this many consecutive training tokens counts
    as dead for AuxK; decay_fraction: the last fraction of steps decays lr linearly to 0."""

    features: int = 4096
    k: int = 32
    lr: float = 4e-4
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_after_tokens: int = 50_000
    decay_fraction: float = 0.2


@dataclass
class DictionaryOutcome:
    dictionary: Dictionary  # in the file's convention (activations' own scale)
    losses: list[float]  # batch FVU per step
    aux_losses: list[float]
    seconds: float
    steps: int
    scale: float  # the scalar the activations were divided by while training
    dead_at_end: int  # latents dead by the training criterion at the last step
    extra: dict[str, float] = field(default_factory=dict)


def geometric_median(x: torch.Tensor, iterations: int = 30, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm on the rows of x [n, d] (float64)."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iterations):
        w = 1.0 / (x - m).norm(dim=1).clamp(min=eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if float((new - m).norm()) < eps * float(m.norm().clamp(min=1.0)):
            return new
        m = new
    return m


class TopKDictionaryModule(pl.LightningModule):
    """A TopK sparse autoencoder on activations already divided by ``scale``.

    Parameters: ``enc`` [F, d] and ``dec`` [F, d] (decoder atoms as rows, so the decoder is
    an embedding_bag), ``b_enc`` [F], ``b_dec`` [d]."""

    def __init__(self, width: int, config: DictionaryConfig, b_dec: torch.Tensor, seed: int):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        atoms = torch.randn(config.features, width, generator=generator)
        atoms = atoms / atoms.norm(dim=1, keepdim=True)
        self.dec = nn.Parameter(atoms.clone())
        self.enc = nn.Parameter(atoms.clone())  # the decoder's transpose (Gao et al. 5.3)
        self.b_enc = nn.Parameter(torch.zeros(config.features))
        self.b_dec = nn.Parameter(b_dec.float().clone())
        self.register_buffer("since_fired", torch.zeros(config.features, dtype=torch.long))
        self.losses: list[float] = []
        self.aux_losses: list[float] = []
        self.total_steps = 1

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values with gradients [B, k], indices [B, k], all pre-activations without)."""
        xc = x - self.b_dec
        with torch.no_grad():
            pre = xc @ self.enc.T + self.b_enc
            index = pre.topk(self.config.k, dim=-1).indices
        # Gradients reach only the selected entries through topk anyway: recompute those
        # k pre-activations alone rather than backpropagating through the dense [B, F].
        atoms = F.embedding(index, self.enc)  # [B, k, d]
        values = torch.relu(torch.einsum("bkd,bd->bk", atoms, xc) + self.b_enc[index])
        return values, index, pre

    def decode_sparse(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(index, self.dec, per_sample_weights=values, mode="sum")

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        values, index, pre = self.encode_topk(x)
        return self.decode_sparse(values, index) + self.b_dec, values, index, pre

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch.float()
        x_hat, values, index, pre = self(x)
        variance = (x - x.mean(0)).pow(2).sum().clamp(min=1e-12)
        loss = (x - x_hat).pow(2).sum() / variance
        with torch.no_grad():
            fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
            fired[index[values > 0]] = True
            self.since_fired += len(x)
            self.since_fired[fired] = 0
            dead = self.since_fired >= self.config.dead_after_tokens
        aux = torch.zeros((), device=x.device)
        n_dead = int(dead.sum())
        if self.config.aux_k and self.config.aux_coef and n_dead:
            # AuxK: the strongest dead latents reconstruct what the live ones missed.
            error = (x - x_hat).detach()
            dead_idx = dead.nonzero().flatten()
            kk = min(self.config.aux_k, n_dead)
            with torch.no_grad():
                pick = dead_idx[pre[:, dead_idx].topk(kk, dim=-1).indices]
            atoms = F.embedding(pick, self.enc)
            aux_values = torch.relu(
                torch.einsum("bkd,bd->bk", atoms, x - self.b_dec.detach()) + self.b_enc[pick]
            )
            e_hat = self.decode_sparse(aux_values, pick)
            aux = (error - e_hat).pow(2).sum() / (error - error.mean(0)).pow(2).sum().clamp(
                min=1e-12
            )
            loss = loss + self.config.aux_coef * aux
        self.losses.append(float(loss.detach()) - self.config.aux_coef * float(aux.detach()))
        self.aux_losses.append(float(aux.detach()))
        self.log("train/fvu", self.losses[-1], prog_bar=True)
        return loss

    def on_after_backward(self) -> None:
        # The decoder atoms live on the unit sphere: drop the radial part of their gradient
        # so Adam moves them along it (Gao et al., appendix).
        if self.dec.grad is not None:
            with torch.no_grad():
                radial = (self.dec.grad * self.dec).sum(1, keepdim=True)
                self.dec.grad -= radial * self.dec

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        with torch.no_grad():
            self.dec /= self.dec.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def configure_optimizers(self):  # type: ignore[override]
        opt = torch.optim.Adam(self.parameters(), lr=self.config.lr, eps=6.25e-10, foreach=False)
        total = max(self.total_steps, 1)
        decay_from = int(total * (1 - self.config.decay_fraction))

        def factor(step: int) -> float:
            if step < decay_from:
                return 1.0
            return max(0.0, (total - step) / max(total - decay_from, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def export(self, scale: float, **meta: object) -> Dictionary:
        """The dictionary on unscaled activations: with x = s x', f_saved = s f' comes from
        W_e (x - s b') + s b_e, and x = W_d f_saved + s b' (unit columns kept)."""
        return Dictionary(
            encoder_weight=self.enc.detach().float().cpu().clone(),
            encoder_bias=(self.b_enc.detach().float().cpu() * scale).clone(),
            decoder_weight=self.dec.detach().float().cpu().T.contiguous(),
            decoder_bias=(self.b_dec.detach().float().cpu() * scale).clone(),
            k=self.config.k,
            layer=int(meta.get("layer", 0)),  # type: ignore[arg-type]
            site=str(meta.get("site", "residual")),
            model=str(meta.get("model", "")),
        )


class _Batches(torch.utils.data.Dataset):
    """Batch i: ``batch`` rows of the activations in a seeded order, reshuffled each epoch."""

    def __init__(self, x: torch.Tensor, steps: int, batch: int, seed: int):
        self.x, self.steps, self.batch = x, steps, batch
        generator = torch.Generator().manual_seed(seed)
        rounds = -(-steps * batch // len(x))
        self.order = torch.cat([torch.randperm(len(x), generator=generator) for _ in range(rounds)])

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[self.order[i * self.batch : (i + 1) * self.batch]]


def train_dictionary(
    spec: TrainerSpec,
    activations: torch.Tensor,
    config: DictionaryConfig,
    batch_tokens: int,
    seed: int = 0,
    layer: int = 0,
    site: str = "residual",
    model_name: str = "",
) -> DictionaryOutcome:
    """Train a TopK dictionary on ``activations`` [n, d] for spec.max_steps steps of
    ``batch_tokens`` rows each; returns it in the file's convention with its loss curve."""
    if spec.world_size > 1 or spec.sharded:
        log.warning(
            "trainer: the dictionary trains in one process (strategy %s, %d device(s) "
            "requested apply to model training, not to a few-MB dictionary)",
            spec.strategy,
            spec.world_size,
        )
    x = activations.float()
    batch_tokens = max(1, min(batch_tokens, len(x)))
    with torch.no_grad():
        sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:16384]]
        median = geometric_median(sample)
        scale = float((x - x.mean(0)).pow(2).sum(1).mean().div(x.shape[1]).sqrt())
        scale = scale if scale > 0 else 1.0
    torch.manual_seed(seed)
    module = TopKDictionaryModule(x.shape[1], config, (median / scale).float(), seed)
    module.total_steps = spec.max_steps
    batches = _Batches(x / scale, spec.max_steps, batch_tokens, seed)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    trainer = pl.Trainer(
        accelerator=spec.resolved_accelerator(),
        devices=1,
        precision=spec.precision,
        max_steps=spec.max_steps,
        max_epochs=-1,
        gradient_clip_val=spec.gradient_clip_val,
        log_every_n_steps=spec.log_every_n_steps,
        deterministic=spec.deterministic,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    dead = int((module.since_fired >= config.dead_after_tokens).sum())
    dictionary = module.export(scale, layer=layer, site=site, model=model_name)
    return DictionaryOutcome(
        dictionary=dictionary,
        losses=module.losses,
        aux_losses=module.aux_losses,
        seconds=seconds,
        steps=int(trainer.global_step),
        scale=scale,
        dead_at_end=dead,
        extra={"tokens_seen": float(trainer.global_step * batch_tokens)},
    )


def default_lr(features: int) -> float:
    """Gao et al.'s width scaling, lr ~ 1/sqrt(F), anchored at 4e-4 for 4096 latents."""
    return 4e-4 * math.sqrt(4096 / features)

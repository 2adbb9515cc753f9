"""DiffusionModule: a backbone trained with the core objective; samples with any core sampler.

Training noise (λ and ε) comes from generators seeded by (seed, rank, step): ranks draw different
noise, and a resumed run draws exactly what the uninterrupted run would have (Lightning does not
restore the global RNG). The loss per λ bin (ε-MSE and weighted loss) is accumulated over each epoch,
summed over ranks and logged as ``train_bins/{eps_mse,loss}_<lo>_<hi>``: the curve a weighting
comparison is about.

Nothing in a training step waits for the device (no ``.item()``, ``.cpu()`` or host copy): the λ-bin
sums stay on the device until the epoch ends, the gradient norm and learning rate are computed only on
the steps whose metrics reach the loggers (``trainer.log_every_n_steps``), the progress bar gets a host
copy of the loss on those steps only (it converts its values at every refresh), and the noise levels
drawn on the host go to the device without a blocking copy. Exception: the ``adaptive`` proposal, whose
density is updated on the host from every step's statistics (one synchronisation per step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from diffusionflow.core.objective import Objective
from diffusionflow.core.predictions import Prediction
from diffusionflow.core.proposals import Adaptive, Proposal
from diffusionflow.core.samplers import Sampler
from diffusionflow.core.schedules import Schedule
from diffusionflow.core.weightings import Weighting
from diffusionflow.data.augment import AugmentPipe
from diffusionflow.lightning.internals import logs_this_step

__all__ = ["DiffusionModule", "step_seed"]


def step_seed(seed: int, rank: int, step: int, stream: int) -> int:
    """A well-mixed 63-bit seed for (seed, rank, step, stream) (numpy SeedSequence)."""
    return int(
        np.random.SeedSequence([seed, rank, step, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1)
    )


class DiffusionModule(LightningModule):
    """Composes backbone + schedule + prediction + weighting + proposal through the objective.

    Args:
        backbone: ``backbone(z_in, c_noise, labels) -> raw output`` (see ``diffusionflow.nn``).
        optimizer: a partial taking the parameters (Hydra ``_partial_: true``).
        lr_scheduler: an optional partial taking the optimizer; stepped every optimizer step.
        num_classes: 0 for unconditional data; else labels are dropped with ``label_dropout`` for
            classifier-free guidance, and sampling uses ``guidance`` (1 = no guidance).
        augment: an augmentation pipeline (EDM's, ``conf/augment/edm.yaml``) applied to each training batch;
            its labels go to the backbone (``augment_labels``), whose ``augment_dim`` must be its label count.
            Sampling and validation pass no labels: no augmentation.

    ``hparams["config"]`` holds the resolved run config as plain containers (set by ``train``), saved in
    checkpoints so ``sample`` can rebuild the model; it is never used for computation here.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: Schedule,
        prediction: Prediction,
        weighting: Weighting,
        proposal: Proposal,
        sampler: Sampler,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        num_classes: int = 0,
        label_dropout: float = 0.0,
        guidance: float = 1.0,
        seed: int = 0,
        loss_bins: int = 12,
        loss_bin_range: tuple[float, float] = (-12.0, 12.0),
        compile: bool = False,
        channels_last: bool = False,
        augment: AugmentPipe | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"config": {}})
        augment_dim = getattr(backbone, "augment_dim", 0)
        label_dim = 0 if augment is None else augment.label_dim
        if augment_dim != label_dim:
            raise ValueError(
                f"backbone.augment_dim={augment_dim} ({type(backbone).__name__}) must equal the number of "
                f"augmentation labels, {label_dim} (model.augment: {augment}); allowed: "
                f"backbone.augment_dim={label_dim} with a UNet backbone, or augment=none with augment_dim 0"
            )
        self.backbone, self.augment = backbone, augment
        self.schedule, self.prediction, self.weighting = schedule, prediction, weighting
        self.proposal, self.sampler = proposal, sampler
        self.objective = Objective(schedule, prediction, weighting, proposal)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.num_classes, self.label_dropout, self.guidance = num_classes, label_dropout, guidance
        self.seed = seed
        self.compile, self.channels_last = compile, channels_last
        self.bin_edges = torch.linspace(*loss_bin_range, loss_bins + 1, dtype=torch.float64)
        self._bin_sums = torch.zeros(2, loss_bins, dtype=torch.float64)
        self._bin_counts = torch.zeros(loss_bins, dtype=torch.float64)
        self._bin_edges_here = self.bin_edges  # bin_edges on the device of the sums

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.compile:
            self.backbone.compile()  # in place: the state dict keeps its keys

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=self.backbone.parameters())
        if self.lr_scheduler_factory is None:
            return opt
        sched = self.lr_scheduler_factory(optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- training -------------------------------------------------------------------------------
    def _generators(self, stream_offset: int = 0) -> tuple[torch.Generator, torch.Generator]:
        """(CPU generator for λ, device generator for ε) for this rank and step."""
        rank, step = self.global_rank, self.global_step
        cpu = torch.Generator().manual_seed(step_seed(self.seed, rank, step, stream_offset))
        dev = torch.Generator(device=self.device).manual_seed(
            step_seed(self.seed, rank, step, stream_offset + 1)
        )
        return cpu, dev

    def _labels_for_training(self, y: Tensor, g: torch.Generator) -> Tensor | None:
        if self.num_classes == 0:
            return None
        drop = torch.rand(y.shape, generator=g, device=g.device) < self.label_dropout
        return torch.where(drop.to(y.device, non_blocking=True), torch.full_like(y, self.num_classes), y)

    def _loss(self, x: Tensor, y: Tensor, stream: int, eps: Tensor | None = None) -> Any:
        """The objective at λ ~ p and ε drawn for this step, or the batch's paired ``eps`` (reflow)."""
        cpu, dev = self._generators(stream)
        net = partial(self.backbone, labels=self._labels_for_training(y, cpu))
        if self.augment is not None:  # the loss on the augmented x, the denoiser told what was done
            if eps is not None:
                raise ValueError("model.augment would break the pairing of x with its noise (reflow pairs)")
            seed = step_seed(self.seed, self.global_rank, self.global_step, stream + 2)
            x, augment_labels = self.augment(x, torch.Generator().manual_seed(seed))
            net = partial(net, augment_labels=augment_labels)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logsnr = self.proposal.sample(x.shape[0], cpu).to(x.device, x.dtype, non_blocking=True)
        if eps is None:
            eps = torch.randn(x.shape, generator=dev, device=x.device, dtype=x.dtype)
        return self.objective(net, x, logsnr=logsnr, eps=eps)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """``batch`` is (x, y), or (x, y, ε) with the noise paired with x (reflow pairs)."""
        x, y, *paired = batch
        res = self._loss(x, y, stream=0, eps=paired[0] if paired else None)
        loss = res.loss.mean()
        self.last_loss, self.last_logsnr = loss.detach(), res.logsnr.detach()  # read by FiniteGuard
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=x.shape[0])
        if logs_this_step(self.trainer):  # the progress bar reads its values at every refresh: a host copy
            self.log("loss", loss.detach().cpu(), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self._accumulate_bins(res.logsnr, res.eps_mse, res.loss)
        if isinstance(self.proposal, Adaptive):
            sums, counts = self.proposal.bin_statistics(res.logsnr, res.eps_mse)
            stats = self.trainer.strategy.reduce(torch.stack([sums, counts]).to(self.device), reduce_op="sum")
            self.proposal.update(*stats.double().cpu())
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """The objective at noise fixed by (seed, batch index), or the batch's paired noise: comparable
        across epochs."""
        x, y, *paired = batch
        cpu = torch.Generator().manual_seed(step_seed(self.seed, self.global_rank, batch_idx, 7))
        dev = torch.Generator(device=self.device).manual_seed(
            step_seed(self.seed, self.global_rank, batch_idx, 8)
        )
        labels = y if self.num_classes else None
        logsnr = self.proposal.sample(x.shape[0], cpu, device=x.device).to(x.dtype)
        eps = paired[0] if paired else torch.randn(x.shape, generator=dev, device=x.device, dtype=x.dtype)
        res = self.objective(partial(self.backbone, labels=labels), x, logsnr=logsnr, eps=eps)
        self.log("val/loss", res.loss.mean(), sync_dist=True, batch_size=x.shape[0])

    def _accumulate_bins(self, logsnr: Tensor, eps_mse: Tensor, loss: Tensor) -> None:
        """Adds the batch's ε-MSE and loss to the sums of their λ bins, on the device (no host copy)."""
        if (device := logsnr.device) != self._bin_sums.device:  # once: the sums live where training runs
            self._bin_sums, self._bin_counts = self._bin_sums.to(device), self._bin_counts.to(device)
            self._bin_edges_here = self.bin_edges.to(device)
        edges = self._bin_edges_here
        i = (torch.searchsorted(edges, logsnr.detach().double(), right=True) - 1).clamp(0, len(edges) - 2)
        self._bin_sums.index_add_(1, i, torch.stack([eps_mse.detach(), loss.detach()]).double())
        self._bin_counts.index_add_(0, i, torch.ones_like(i, dtype=torch.float64))

    def on_train_epoch_end(self) -> None:
        packed = torch.cat([self._bin_sums.flatten(), self._bin_counts]).to(self.device)
        packed = self.trainer.strategy.reduce(packed, reduce_op="sum").double().cpu()  # once an epoch
        k = len(self._bin_counts)
        sums, counts = packed[: 2 * k].reshape(2, k), packed[2 * k :]
        for j in range(k):
            if counts[j] > 0:
                lo, hi = float(self.bin_edges[j]), float(self.bin_edges[j + 1])
                for row, key in enumerate(("eps_mse", "loss")):
                    self.log(
                        f"train_bins/{key}_{lo:+.0f}_{hi:+.0f}",
                        float(sums[row, j] / counts[j]),
                        sync_dist=False,
                    )
        self._bin_sums.zero_()
        self._bin_counts.zero_()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradient's 2-norm and the learning rate, on the steps whose metrics are written only."""
        if not logs_this_step(self.trainer):
            return
        grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
        if grads:  # none when FiniteGuard skipped the step (every gradient None)
            norm = torch.nn.utils.get_total_norm(grads, 2.0)
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    # ---- sampling -------------------------------------------------------------------------------
    def denoiser(self, labels: Tensor | None = None, guidance: float | None = None) -> Callable:
        """``denoise(z, t) -> x̂`` for the samplers; classifier-free guidance
        x̂ = x̂(∅) + w (x̂(y) − x̂(∅)) when ``guidance`` w ≠ 1 (Ho & Salimans 2022). No augmentation labels
        are passed: the backbone's are zero, the model of un-augmented images (EDM, App. F.2)."""
        w = self.guidance if guidance is None else guidance
        null = None if labels is None else torch.full_like(labels, self.num_classes)

        def x_hat(z: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
            o = self.schedule(t.to(torch.float64))
            alpha, sigma = (v.to(z.dtype).to(z.device) for v in (o.alpha, o.sigma))
            c_noise = self.prediction.c_noise(o.logsnr).to(z.dtype).to(z.device).expand(z.shape[0])
            out = self.backbone(self.prediction.c_in(alpha, sigma) * z, c_noise, labels=y)
            return self.prediction.to_x_eps(out, z, alpha, sigma)[0]

        def denoise(z: Tensor, t: Tensor) -> Tensor:
            cond = x_hat(z, t, labels)
            if labels is None or w == 1.0:
                return cond
            uncond = x_hat(z, t, null)
            return uncond + w * (cond - uncond)

        return denoise

    @torch.no_grad()
    def generate(
        self,
        noise: Tensor,
        labels: Tensor | None = None,
        sampler: Sampler | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples from ``noise`` ~ N(0, I) with ``sampler`` (default: the configured one)."""
        if self.num_classes == 0 and labels is not None:
            raise ValueError("labels were given to an unconditional model (data.num_classes=0)")
        sampler = self.sampler if sampler is None else sampler
        return sampler(self.denoiser(labels, guidance), noise, self.schedule, generator=generator)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(self.proposal, Adaptive):
            checkpoint["adaptive_proposal"] = self.proposal.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(self.proposal, Adaptive) and "adaptive_proposal" in checkpoint:
            self.proposal.load_state_dict(checkpoint["adaptive_proposal"])

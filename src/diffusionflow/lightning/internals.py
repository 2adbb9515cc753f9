"""The one module that reaches into Lightning's private attributes (Lightning 2.6), for what it offers no
public API for. Each accessor checks that the attribute is there and fails loudly, naming the Lightning
version and this module, rather than doing the wrong thing after an upgrade;
``tests/lightning/test_internals.py`` exercises every one of them on a real ``Trainer``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch import __version__ as lightning_version
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = [
    "averaged_model",
    "averaging",
    "cluster_environment",
    "hpc_save_path",
    "latest_update_step",
    "logs_this_step",
    "request_stop",
    "slurm_requeue",
]


def _get(obj: Any, *names: str) -> Any:
    """``obj.<names[0]>.<names[1]>…``, or a RuntimeError naming the missing attribute."""
    for name in names:
        if not hasattr(obj, name):
            raise RuntimeError(
                f"lightning {lightning_version}: {type(obj).__name__} has no {name!r} any more; update "
                "diffusionflow.lightning.internals for this Lightning version"
            )
        obj = getattr(obj, name)
    return obj


def averaging(callback: WeightAveraging) -> AveragedModel:
    """The ``AveragedModel`` that ``callback`` maintains (``_average_model``): ``.module`` the averaged copy,
    ``.n_averaged`` the number of updates made (a tensor on its device, saved in checkpoints)."""
    average = _get(callback, "_average_model")
    if average is None:
        raise RuntimeError(
            f"{type(callback).__name__} has no averaged model yet: it is created in setup(stage='fit')"
        )
    _get(average, "n_averaged")
    return average


def averaged_model(callback: WeightAveraging) -> nn.Module:
    """The averaged copy of the weights that ``callback`` maintains (the EMA model), unwrapped: a module
    separate from the LightningModule, updated after each step (``_average_model.module``)."""
    return _get(averaging(callback), "module")


def latest_update_step(callback: WeightAveraging, step: int | None = None) -> int:
    """The global step of ``callback``'s last update (``_latest_update_step``, in its checkpoint state);
    set to ``step`` when given."""
    if step is not None:
        _get(callback, "_latest_update_step")
        callback._latest_update_step = step
    return _get(callback, "_latest_update_step")


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether the metrics logged in the current training step reach the loggers (every
    ``trainer.log_every_n_steps`` optimizer steps, and when the run stops): Lightning's own test, right
    from ``on_train_batch_start`` to ``on_train_batch_end``, under gradient accumulation and after a
    mid-epoch resume too (``_logger_connector.should_update_logs``, as its ``LearningRateMonitor`` uses)."""
    return bool(_get(trainer, "_logger_connector", "should_update_logs"))


def request_stop(trainer: pl.Trainer) -> None:
    """Makes the fit loop stop at the next batch boundary, on every rank, as after SIGTERM (Lightning
    then raises ``SIGTERMException``; ``trainer.should_stop`` would end the run as if finished)."""
    connector = _get(trainer, "_signal_connector")
    _get(connector, "received_sigterm")
    connector.received_sigterm = True


def cluster_environment(trainer: pl.Trainer) -> ClusterEnvironment:
    """The cluster environment the trainer detected (``SLURMEnvironment`` under SLURM), also with a
    single-device strategy, which has no public ``cluster_environment``."""
    return _get(trainer, "_accelerator_connector", "cluster_environment")


def hpc_save_path(trainer: pl.Trainer) -> str:
    """Where Lightning's SLURM requeue writes its next ``hpc_ckpt_<n>.ckpt`` (and, under SLURM, resumes
    from)."""
    return _get(trainer, "_checkpoint_connector", "hpc_save_path")(trainer.default_root_dir)


def slurm_requeue(trainer: pl.Trainer, signum: int) -> None:
    """Lightning's own SLURM requeue routine: saves ``hpc_ckpt_<n>.ckpt`` and, on rank 0, runs
    ``scontrol requeue $SLURM_JOB_ID``."""
    _get(trainer, "_signal_connector", "_slurm_sigusr_handler_fn")(signum, None)

"""Lightning glue: the DiffusionModule, the DataModule, callbacks (samples, FID, EMA) and loggers setup."""

from .datamodule import DiffusionDataModule

__all__ = ["DiffusionDataModule"]

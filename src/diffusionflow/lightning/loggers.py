"""A CSV logger that appends to the run folder's ``metrics.csv`` instead of deleting it.

Lightning's ``CSVLogger`` removes an existing ``metrics.csv`` when it starts in a non-empty folder, so a
run resumed in place (``resume=auto``, ``ckpt_path=``) would lose every row logged before the resume.
``AppendingCSVLogger`` keeps them: new rows are appended, and when a row brings keys the file does not
have yet the file is rewritten once with the union header, the earlier rows unchanged (their new
columns empty). Nothing is deleted, so rows logged after the checkpoint a resume starts from (work that
is redone) appear twice, once per attempt, in the order they were written.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricExperimentWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["AppendingCSVLogger", "AppendingExperimentWriter"]


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's writer, starting from the header of an existing ``metrics.csv`` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        # Lightning's check deletes metrics.csv; here its header becomes the starting set of keys, so
        # rows that bring no new key are appended as they are.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = list(header)  # the file's column order: appended rows must match it

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning's version writes rows whose keys are not all in ``fieldnames`` with DictWriter's
        # default (an error); the union header always holds the file's keys, but be explicit.
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        names = sorted(set(fieldnames).union(*(r.keys() for r in rows)) - {None})
        self.metrics_keys = names
        with self._fs.open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            writer.writerows(rows)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a restart in the same folder (rows are appended).

    Takes ``CSVLogger``'s arguments; the run config sets ``version: ""`` so the file is
    ``<save_dir>/<name>/metrics.csv`` whatever the number of restarts.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _FabricExperimentWriter:
        """The writer (rank 0; a no-op stand-in on other ranks), created on first use."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

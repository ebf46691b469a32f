"""Distillation inside a search's trials (issue 25): when a trial distils from the base model, and until when.

``space.distill`` is the weight of the KL term to the base model's softened logits in the fine-tune after
surgery (Hinton et al. 2015; :func:`autoprune.train_support.training_loss`). A teacher only helps while it
is ahead of its student: on Fashion-MNIST VGG-16-BN with 10,000 fine-tune images, LRF distilled from an
86.4 % base finished at 87.1-87.4 % and LRF without it at 88.3-88.5 % (README, Performance). So a trial
stops distilling after the first epoch whose validation reading reaches the teacher's validation accuracy
(``TrainConfig.distill_until``), and once any finished trial of the study has reached it, later trials do not
distil at all, whatever their ``distill`` parameter says (``trials.csv`` column ``distill_epochs``). Any
finished trial counts, however lightly pruned: on that VGG-16-BN search, LRF at 0.3 / 0.2 finished at
0.8867 / 0.8840 without a teacher, 0.8813 / 0.8780 distilling their first epoch (when only trials pruned
at least as hard counted) and 0.8707 / 0.8720 distilling all three: each teacher epoch cost about half a
point, although the 0.5 trial that had reached the teacher was pruned less.

Measured and reverted: also skipping the teacher for a trial whose reading before the fine-tune is within
one standard error of the teacher's (VGG-16-BN, LRF at 0.5: 0.862 against 0.864). Long regime: that trial
finished at 0.8847 instead of 0.8823, 577 CPU s of work instead of 782 (the VM ran 18 % faster that
day), front unchanged; short regime (1,000 images): 0.8590 instead of 0.8630, front hypervolume 0.687
instead of 0.689. Soft targets help a data-starved fine-tune even from a teacher no better than the
student, so "not measurably ahead" is no reason to drop it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from .early_stop import Reference

log = logging.getLogger(__name__)


def distillation(teacher_acc: Callable[[], float], hparams: Mapping[str, Any], reference: Callable[[], Reference],
                 number: int) -> tuple[float, float | None]:
    """The fine-tune's distillation weight and the validation accuracy at which it stops (the teacher's),
    for trial ``number`` with parameters ``hparams``; ``teacher_acc()`` measures the base on the search's
    validation split and ``reference()`` reads the finished trials so far (both called only when the trial
    would distil). (0, None) when the trial does not distil."""
    alpha = float(hparams.get("distill") or 0.0)
    if alpha <= 0:
        return 0.0, None
    teacher = teacher_acc()
    reached = [max(a for a in p.curve if a is not None) for p in reference().peers
               if any(a is not None for a in p.curve)]
    if reached and max(reached) >= teacher:
        log.info("trial %d does not distil: a finished trial reached %.4f, the teacher's "
                 "val_acc is %.4f", number, max(reached), teacher)
        return 0.0, None
    return alpha, teacher

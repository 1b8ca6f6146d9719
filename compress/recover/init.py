"""Closed-form initialisation of a replaced layer: ridge least squares on calibration activations.

Why: AdcSR's student drops the teacher's input path (LR -> bicubic x4 -> VAE encoder -> latent ->
UNet ``conv_in``) for ``PixelUnshuffle(2)`` of the LR straight into a new UNet ``conv_in``. After
``remove`` and ``prune`` that conv holds the teacher's ``conv_in`` weights widened and sliced onto a
different input (pixels, not latents), so the student's very first activation means nothing to
the UNet blocks behind it, and stage 2 spends its budget re-learning it through the whole network.
The best linear map from the unshuffled LR to what the teacher's ``conv_in`` produces on its own
latent path is a least-squares problem with a closed form, so it is solved, not trained:

    min_W ||A W - Y||^2 + lambda ||W||^2      A: im2col patches (F.unfold) of the student's input
                                              (+ a ones column for the bias, not penalised),
                                              Y: the teacher conv_in's output, kept channels only.

The normal equations are accumulated in float64 over batches (any number of calibration crops in
constant memory), and the residual before and after comes from the same sufficient statistics.
``lambda`` is relative to the mean diagonal of A^T A (scale-free). The fit cannot do worse than the
conv's current weights on the calibration data (a ridge solution minimises the penalised loss),
and it reproduces a linear map exactly when one exists (``ridge=0``).

The teacher is run only up to its ``conv_in`` (a hook stops the forward there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdcError


# --------------------------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------------------------
def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col rows of ``x`` as ``conv`` sees them: (B*L, Cin*kh*kw), in the weight's flattening order."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str):
        raise AdcError(f"closed-form init: needs a plain Conv2d (groups 1, zero padding given as numbers), got {conv}")
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass
class RidgeFit:
    """Sufficient statistics of one linear fit ``[A, 1] W ~ Y``, accumulated batch by batch."""

    bias: bool = True
    gram: torch.Tensor | None = None    # [A,1]^T [A,1]
    cross: torch.Tensor | None = None   # [A,1]^T Y
    yy: float = 0.0                     # sum Y^2
    ysum: torch.Tensor | None = None    # column sums of Y
    rows: int = 0

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        a, y = a.double(), y.double()
        if a.shape[0] != y.shape[0]:
            raise AdcError(f"closed-form init: {a.shape[0]} input rows vs {y.shape[0]} target rows")
        if self.bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        g, c = a.T @ a, a.T @ y
        self.gram = g if self.gram is None else self.gram + g
        self.cross = c if self.cross is None else self.cross + c
        self.ysum = y.sum(0) if self.ysum is None else self.ysum + y.sum(0)
        self.yy += float(y.pow(2).sum())
        self.rows += a.shape[0]

    def solve(self, ridge: float = 1e-3) -> torch.Tensor:
        """W (D[+1], Cout): ridge ``lambda = ridge * mean(diag(A^T A))``, the bias row not penalised."""
        if self.gram is None:
            raise AdcError("closed-form init: no calibration data")
        g = self.gram.clone()
        d = g.shape[0] - (1 if self.bias else 0)
        lam = ridge * float(torch.diagonal(g)[:d].mean())
        g.diagonal()[:d] += lam
        try:
            return torch.linalg.solve(g, self.cross)
        except RuntimeError:  # singular (ridge 0 on rank-deficient data): the minimum-norm solution
            return torch.linalg.lstsq(g, self.cross, driver="gelsd" if g.device.type == "cpu" else None).solution

    def residual(self, w: torch.Tensor) -> float:
        """||[A,1] W - Y|| / ||Y - column means of Y||: 1.0 = no better than a constant per channel."""
        w = w.double()
        sq = float((w * (self.gram @ w)).sum() - 2 * (w * self.cross).sum()) + self.yy
        centred = self.yy - float(self.ysum.pow(2).sum()) / max(self.rows, 1)
        return max(sq, 0.0) ** 0.5 / max(centred, 1e-300) ** 0.5


def conv_as_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's weights as the fit's W: (Cin*kh*kw [+1], Cout)."""
    w = conv.weight.detach().reshape(conv.out_channels, -1).T.double()
    if conv.bias is not None:
        w = torch.cat([w, conv.bias.detach().double()[None]], 0)
    return w


@torch.no_grad()
def fit_conv(conv: nn.Conv2d, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], ridge: float = 1e-3
             ) -> dict[str, Any]:
    """Fit ``conv`` in place so that ``conv(x) ~ y`` over ``batches`` of (x, y); y is (B, Cout, H', W').

    Returns the relative residual before/after (:meth:`RidgeFit.residual`), the rows and unknowns.
    """
    stats = RidgeFit(bias=conv.bias is not None)
    for x, y in batches:
        a = conv_patches(conv, x.to(conv.weight.device, torch.float64))
        if y.shape[1] != conv.out_channels:
            raise AdcError(f"closed-form init: targets have {y.shape[1]} channels, the conv outputs "
                           f"{conv.out_channels}")
        yrows = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        if yrows.shape[0] != a.shape[0]:
            raise AdcError(f"closed-form init: target maps {tuple(y.shape[-2:])} do not match the conv's output size "
                           f"for input {tuple(x.shape[-2:])}")
        stats.add(a, yrows.to(a.device))
    before = stats.residual(conv_as_matrix(conv))
    w = stats.solve(ridge)
    after = stats.residual(w)
    kin = conv.weight[0].numel()
    conv.weight.copy_(w[:kin].T.reshape(conv.weight.shape).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.copy_(w[kin].to(conv.bias.dtype))
    return {"residual_before": before, "residual_after": after, "rows": stats.rows, "unknowns": int(w.shape[0]),
            "ridge": ridge}


# --------------------------------------------------------------------------------------------
# Which teacher channels the student kept
# --------------------------------------------------------------------------------------------
def match_channels(student: torch.Tensor, teacher: torch.Tensor) -> list[int] | None:
    """Indices ``idx`` (increasing) with ``teacher[idx] == student`` exactly, row by row, or None.

    Channel pruning copies what it keeps, so a per-channel parameter (e.g. the GroupNorm after the
    layer, rows = (weight, bias)) of the student is a subsequence of the teacher's. None when the
    teacher's rows are not unique (e.g. an untrained GroupNorm) or no such subsequence exists.
    """
    if student.shape[1:] != teacher.shape[1:] or student.shape[0] > teacher.shape[0]:
        return None
    rows = [tuple(r.tolist()) for r in teacher]
    if len(set(rows)) != len(rows):
        return None
    where = {r: i for i, r in enumerate(rows)}
    idx = [where.get(tuple(r.tolist()), -1) for r in student]
    if -1 in idx or any(b <= a for a, b in zip(idx, idx[1:])):
        return None
    return idx


def kept_channels(student_width: int, teacher_width: int, student_ref: torch.Tensor | None = None,
                  teacher_ref: torch.Tensor | None = None) -> tuple[list[int], str]:
    """(teacher channel of each student channel, how it was found).

    Same width: all. Otherwise matched by a per-channel parameter the pruning copied
    (:func:`match_channels`), else the leading ``student_width`` channels (what AdcSR's slice keeps).
    """
    if student_width == teacher_width:
        return list(range(teacher_width)), "all (same width)"
    if student_width > teacher_width:
        raise AdcError(f"closed-form init: the student's conv_in is wider ({student_width}) than the teacher's "
                       f"({teacher_width})")
    if student_ref is not None and teacher_ref is not None:
        idx = match_channels(student_ref.detach().cpu(), teacher_ref.detach().cpu())
        if idx is not None:
            lead = idx == list(range(student_width))
            return idx, (f"the leading {student_width} of {teacher_width}" if lead else
                         f"{student_width} of {teacher_width}") + " (matched by the next GroupNorm's parameters)"
    return list(range(student_width)), (f"the leading {student_width} of {teacher_width} (assumed, as AdcSR's "
                                        "slice keeps them: no unique match by the next GroupNorm)")


# --------------------------------------------------------------------------------------------
# The teacher's activation at one layer
# --------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


@torch.no_grad()
def layer_output(run: Callable[[], Any], layer: nn.Module) -> torch.Tensor:
    """The output of ``layer`` during ``run()``; the forward is stopped right after it."""
    got: dict[str, torch.Tensor] = {}

    def hook(_m, _inp, out):
        got["y"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if "y" not in got:
        raise AdcError("closed-form init: the teacher's layer did not run")
    return got["y"]


@dataclass
class ConvInFit:
    """What :func:`fit_student_conv_in` did, for the stage's artifacts."""

    residual_before: float
    residual_after: float
    crops: int
    rows: int
    unknowns: int
    ridge: float
    channels: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"relative_residual": f"{self.residual_before:.4f} -> {self.residual_after:.4f}",
                "residual_before": self.residual_before, "residual_after": self.residual_after,
                "crops": self.crops, "rows": self.rows, "unknowns": self.unknowns, "ridge": self.ridge,
                "teacher_channels": self.channels,
                "residual": "||conv(x) - teacher conv_in|| / ||teacher conv_in - its channel means|| on the "
                            "calibration crops"}


def _first_norm(unet: nn.Module) -> torch.Tensor | None:
    """(C, 2) rows of (weight, bias) of the GroupNorm reading ``conv_in``'s output (SD UNets:
    ``down_blocks.0.resnets.0.norm1``), or None."""
    try:
        m = unet.get_submodule("down_blocks.0.resnets.0.norm1")
    except AttributeError:
        return None
    if not isinstance(m, nn.GroupNorm) or not m.affine:
        return None
    return torch.stack([m.weight.detach().float(), m.bias.detach().float()], 1)


@torch.no_grad()
def fit_student_conv_in(student: nn.Module, teacher_latent: Callable[[torch.Tensor], Any],
                        teacher_unet: nn.Module, lr_batches: Iterable[torch.Tensor], ridge: float = 1e-3
                        ) -> ConvInFit:
    """Fit an :class:`~compress.zoo.adcsr.AdcSR` student's UNet ``conv_in`` to the teacher UNet's ``conv_in``.

    ``teacher_latent(lr)`` runs the teacher's one-step path on LR in [-1, 1] (it is stopped at
    ``teacher_unet.conv_in``); ``lr_batches``: calibration LR batches in [-1, 1].
    """
    conv = student.unet.conv_in
    t_conv = teacher_unet.conv_in
    t_width = getattr(t_conv, "out_channels", None) or t_conv.base_layer.out_channels  # peft wraps it
    idx, how = kept_channels(conv.out_channels, t_width, _first_norm(student.unet), _first_norm(teacher_unet))
    crops = 0
    t_dtype = next(teacher_unet.parameters()).dtype

    def pairs():
        nonlocal crops
        for lr in lr_batches:
            dev = next(teacher_unet.parameters()).device
            y = layer_output(lambda: teacher_latent(lr.to(dev, t_dtype)), t_conv)[:, idx]
            if y.shape[0] != lr.shape[0]:
                raise AdcError(f"closed-form init: the teacher's conv_in ran on {y.shape[0]} rows for {lr.shape[0]} "
                               "LR images (a guidance batch?); this family is not supported")
            crops += lr.shape[0]
            yield student.unshuffle(lr.to(conv.weight.device, torch.float64)), y.double()

    res = fit_conv(conv, pairs(), ridge)
    return ConvInFit(res["residual_before"], res["residual_after"], crops, res["rows"], res["unknowns"], ridge, how)


def calibration_lr(train_hr: list, crop: int, degradation, n: int, seed: int, batch: int = 8):
    """``n`` LR crops in [-1, 1], in batches: HR crops of the training folders (``seed``: their own
    draw, not the training stream's) degraded as in training, each with its own seeded generator."""
    from .decoder_pretrain import hr_crops
    from .engine import item_seed

    data = hr_crops(list(train_hr), crop, False, seed)
    out = []
    for k in range(n):
        epoch, index = divmod(k, len(data))
        data.set_epoch(epoch)
        g = torch.Generator().manual_seed(item_seed(seed, epoch, index, tag=3))
        out.append(degradation(data[index][None], generator=g) * 2 - 1)
        if len(out) == batch or k == n - 1:
            yield torch.cat(out)
            out = []


__all__ = ["conv_patches", "RidgeFit", "conv_as_matrix", "fit_conv", "match_channels", "kept_channels",
           "layer_output", "ConvInFit", "fit_student_conv_in", "calibration_lr"]

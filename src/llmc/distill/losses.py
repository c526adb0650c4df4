"""Distillation losses on next-token distributions, per token, averaged over tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def teacher_targets(logits: Tensor, temperature: float,
                    topk: int = 0) -> tuple[Tensor, Tensor | None]:
    """The teacher's soft targets from its logits [..., V]: log-probabilities at
    ``temperature``, over the whole vocabulary or (``topk`` > 0) over its ``topk`` most likely
    tokens, renormalised (values [..., k] and their indices). Keeping only these saves memory
    when teacher outputs are stored."""
    z = logits.float() / temperature
    if topk:
        vals, idx = torch.topk(z, topk, dim=-1)
        return torch.log_softmax(vals, dim=-1), idx
    return torch.log_softmax(z, dim=-1), None


def kl_loss(student_logits: Tensor, teacher_logp: Tensor, teacher_idx: Tensor | None,
            temperature: float) -> Tensor:
    """KL(teacher || student) per token at ``temperature``, times ``temperature**2`` (Hinton
    et al.: keeps gradient magnitudes comparable across temperatures). With top-k targets the
    student's log-probabilities are renormalised over the same k tokens."""
    s = student_logits.float() / temperature
    if teacher_idx is None:
        s_logp = torch.log_softmax(s, dim=-1)
    else:
        s_logp = torch.log_softmax(torch.gather(s, -1, teacher_idx), dim=-1)
    p = teacher_logp.exp()
    kl = (p * (teacher_logp - s_logp)).sum(-1)
    return kl.mean() * temperature**2


def lm_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy of ``logits`` [B, T, V] on the token ids [B, T]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

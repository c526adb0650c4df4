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


def relative_mse(out: Tensor, target: Tensor) -> Tensor:
    """``||out - target||^2 / ||target||^2`` in float32."""
    out, target = out.float(), target.float()
    return ((out - target) ** 2).sum() / (target**2).sum().clamp_min(1e-12)


def hidden_loss(student_hidden: tuple[Tensor, ...], teacher_hidden: tuple[Tensor, ...]) -> Tensor:
    """The mean over decoder layers of the relative MSE between the student's and the
    teacher's hidden states (``output_hidden_states`` of a transformers forward: the
    embeddings, then one entry per layer; the embeddings are left out)."""
    pairs = list(zip(student_hidden[1:], teacher_hidden[1:], strict=True))
    return torch.stack([relative_mse(s, t) for s, t in pairs]).mean()


def lm_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy of ``logits`` [B, T, V] on the token ids [B, T]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

"""Distillation: a compressed student learns from its uncompressed teacher (``distill_logits``),
keeping its zeros and its quantization grid (``constraints``)."""

from llmc.methods.distill.train import Distill, DistillConfig, distill_logits, snapshot_teacher

__all__ = ["Distill", "DistillConfig", "distill_logits", "snapshot_teacher"]

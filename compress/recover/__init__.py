"""Recovery training after compression: the shared engine and the two AdcSR stages.

* :mod:`.engine` -- accelerate training loop: mixed precision, accumulation, DDP, atomic
  checkpoints with RNG + data position (bit-identical resume), NaN guard, metrics CSV + curve.
* :mod:`.decoder_pretrain` -- stage 1: the pruned VAE decoder learns to decode frozen latents.
* :mod:`.distill` -- stage 2: feature distillation + adversarial term, general over
  student/teacher families, with AdcSR's instance (:func:`~.distill.adcsr_bundle`).

Modules are imported on use (they pull diffusers/peft/accelerate).
"""

__all__ = ["engine", "decoder_pretrain", "distill"]

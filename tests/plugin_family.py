"""A model family defined outside ``compress/``: a one-step SR model on an SD-1.5-shaped UNet.

This is the whole of what a third party writes to run its own model through every stage of
``compress.run`` (the README's "Add a model family" walks through it). It registers itself on
import, so a recipe names it with ``plugins: [plugin_family]`` and ``models: {family: sd15-onestep}``.
"""

from __future__ import annotations

import torch

from compress.families import DistillParts, ModelFamily, PipelineSpec, StudentParts, register
from compress.families.sd import DecodeInput, FixedPrompt, RealLatent, base_copy
from compress.student import decoder_part, unet_part
from compress.zoo.construct import build_module
from compress.zoo.lora import sd_unet_lora_targets
from compress.zoo.onestep import OneStepConfig, OneStepSR

# SD 1.5's layout at tiny widths: conv proj_in, 8 heads everywhere, 768 -> 32 text width.
UNET = dict(sample_size=16, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(24, 48, 72, 72),
            layers_per_block=2, attention_head_dim=8, cross_attention_dim=32, use_linear_projection=False,
            norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32), layers_per_block=2,
           latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.18215)


class SD15OneStepFamily(ModelFamily):
    name = "sd15-onestep"
    title = "one-step SR on an SD-1.5-shaped UNet"
    profile = PipelineSpec("SD15 one-step", lambda model, lr: [("forward", model, (lr,))])

    def build_teacher(self, size, device="cpu", options=None):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        return build_module(lambda: OneStepSR(UNet2DConditionModel(**UNET), AutoencoderKL(**VAE), None,
                                              OneStepConfig(timestep=999)), device)

    def example_inputs(self, lr_size, device="cpu", teacher=None):
        # the fixed text condition is an input of the forward: the analysis labels it as the prompt
        return {"lr": torch.zeros(1, 3, lr_size, lr_size, device=device),
                "prompt_embeds": torch.zeros(1, 77, UNET["cross_attention_dim"], device=device)}

    def student_parts(self, size, weights, init, teacher, device="cpu"):
        t = teacher()  # the student starts from the teacher's own UNet and decoder
        return StudentParts(unet_part(base_copy(t.unet), "unet"), decoder_part(base_copy(t.vae), "vae.decoder"),
                            "the SD-1.5-shaped teacher")

    def real_vae(self, size, weights, teacher):
        return base_copy(teacher().vae)

    def distill_parts(self, teacher, size, weights, options=None):
        return DistillParts(teacher_latent=lambda lr, emb: teacher.teacher_latent(lr),
                            decode_input=DecodeInput(teacher.vae, teacher.scaling_factor),
                            real_latent=RealLatent(base_copy(teacher.vae)), disc_unet=base_copy(teacher.unet),
                            disc_lora_targets=sd_unet_lora_targets,
                            prompts=lambda mode, text: FixedPrompt(lambda: teacher.prompt_embeds),
                            timestep=teacher.timestep, teacher=teacher)


register(SD15OneStepFamily)
__all__ = ["SD15OneStepFamily", "UNET", "VAE"]

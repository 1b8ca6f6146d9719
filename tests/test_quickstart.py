"""The README's API quickstart, as a test: analyse -> plan -> apply -> save -> load, on a diffusers UNet."""

import torch

from compress.zoo.sd import unet_config


def test_quickstart(tmp_path, one_thread):
    from diffusers import UNet2DConditionModel

    from compress.analysis import analyse, unet_facts
    from compress.prune import ChannelPruneConfig, load_compressed, prune_channels, remove_conditioning, save_compressed
    from compress.student import unet_part

    unet = UNet2DConditionModel(**unet_config("tiny")).eval()  # or UNet2DConditionModel.from_pretrained(local_dir)
    inputs = {"sample": torch.zeros(1, 4, 16, 16), "timestep": torch.tensor([999]),
              "encoder_hidden_states": torch.zeros(1, 77, 32)}
    plan = analyse(unet, unet_facts("dropped"), inputs).plan  # what goes, what folds, what is pruned (and its graph)
    part = plan.part("unet")
    base = unet_part(unet).base  # the record that rebuilds the dense architecture
    small, r1 = remove_conditioning(unet, planned=part.names("remove") + part.names("fold"))
    small, r2 = prune_channels(small, ChannelPruneConfig(pruning_ratio=0.25, interfaces=part.interfaces),
                               torch.randn(1, 4, 16, 16), graph=plan.take_graph("unet", small))
    save_compressed(small, [base, r1, r2], tmp_path / "unet-small")
    again = load_compressed(tmp_path / "unet-small")

    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    assert r2.params_after < 0.7 * r1.params_after and r2.extra["graph"] == "the analysis plan's"

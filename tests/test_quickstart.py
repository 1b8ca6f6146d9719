"""The README's API quickstart, as a test: analyse -> plan -> apply -> save -> load, on a diffusers UNet,
with every call imported from ``compress``; and ``import compress`` staying cheap."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import torch

import compress


def test_quickstart(tmp_path, one_thread):
    from diffusers import UNet2DConditionModel

    from compress import (ChannelPruneConfig, analyse, from_pretrained, load_records, prune_channels,
                          remove_conditioning, save_pretrained, unet_config, unet_facts)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("tiny")).eval()  # or UNet2DConditionModel.from_pretrained(local_dir)
    inputs = {"sample": torch.zeros(1, 4, 16, 16), "timestep": torch.tensor([999]),
              "encoder_hidden_states": torch.zeros(1, 77, 32)}
    with torch.no_grad():
        original = unet(**inputs).sample
    plan = analyse(unet, unet_facts("dropped"), inputs).plan  # what goes, what folds, what is pruned (and its graph)
    part = plan.part("unet")
    small, r1 = remove_conditioning(unet, planned=part.names("remove") + part.names("fold"))  # unet left intact
    small, r2 = prune_channels(small, ChannelPruneConfig(pruning_ratio=0.25, interfaces=part.interfaces),
                               torch.randn(1, 4, 16, 16), graph=plan.take_graph("unet", small))
    save_pretrained(small, tmp_path / "unet-small", [r1, r2], base=unet)  # weights + the records that rebuild it
    again = from_pretrained(tmp_path / "unet-small")

    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
        assert torch.equal(unet(**inputs).sample, original)  # the transforms edited copies
    assert r2.params_after < 0.7 * r1.params_after and r2.extra["graph"] == "the analysis plan's"
    records = load_records(tmp_path / "unet-small")  # kept inside, and they round-trip
    assert [r.op for r in records] == ["base", "remove_conditioning", "prune_channels"]
    assert records[0].args["target"] == "diffusers:UNet2DConditionModel" and records[0].params_after == sum(
        p.numel() for p in unet.parameters())
    as_json = lambda rs: json.loads(json.dumps([r.to_dict() for r in rs], default=list))  # noqa: E731
    assert as_json(records[1:]) == as_json([r1, r2])


def test_import_compress_is_cheap_and_lazy():
    code = ("import sys, compress; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules; "
            "assert {'analyse', 'save_pretrained', 'from_pretrained'} <= set(dir(compress)); "
            "compress.unet_config; assert 'diffusers' not in sys.modules; print(compress.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for argv in (["--help"], ["--version"], ["sr", "--help"], ["export", "--help"]):  # the CLI's cheap paths
        code = ("import sys; from compress.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
                "assert 'torch' not in sys.modules, %r" % (argv, argv))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr


def test_every_public_name_resolves_and_the_type_checking_imports_match():
    for name in compress.__all__:
        assert getattr(compress, name) is not None
    tree = ast.parse(Path(compress.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    typed = {a.asname or a.name for n in block.body for a in n.names}
    assert typed == set(compress.__all__) - {"__version__"}

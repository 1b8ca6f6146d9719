"""A shared ``.pt2`` never runs code on load, and a dynamic one runs any LR size.

``torch.export.load`` itself unpickles parts of an archive with ``weights_only=False`` (weights or
constants marked ``use_pickle``, and a fallback when the safe load of the sample inputs fails), so
these tests craft archives that would write a marker file if any such path ran, and check that
adc refuses them with one line and that the marker never appears.
"""

import pytest
import torch

from compress.deploy import export_model, load_exported
from compress.errors import AdcError
from compress.zoo.adcsr import build_adcsr
from profiling.hostile import pt2_with_pickled_inputs, pt2_with_pickled_weight


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    """A static export (seconds): every load path the crafted archives take is the same for a dynamic one."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    export_model(build_adcsr("tiny").eval(), path, "torch-export", 16, source="tests: tiny seed 0")
    return path


def test_pickled_weight_payload_is_refused_without_running_it(program, tmp_path):
    marker = tmp_path / "ran"
    crafted = pt2_with_pickled_weight(program, tmp_path / "crafted.pt2", marker)
    with pytest.raises(AdcError, match=r"crafted\.pt2: refused to load.*arbitrary code.*refused io\.open"):
        load_exported(crafted)
    assert not marker.exists()


def test_unsafe_sample_inputs_do_not_fall_back_to_an_unsafe_load(program, tmp_path):
    marker = tmp_path / "ran"
    crafted = pt2_with_pickled_inputs(program, tmp_path / "crafted.pt2", marker)
    with pytest.raises(AdcError, match=r"crafted\.pt2: refused to load"):
        load_exported(crafted)
    assert not marker.exists()


def test_the_untouched_archive_loads_and_the_switch_is_restored(program, monkeypatch):
    import os

    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    model = load_exported(program)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 64, 64)


@pytest.mark.slow  # a dynamic torch.export of the tiny student: about 20 s
def test_a_dynamic_program_runs_an_lr_of_one_block(tmp_path):
    torch.manual_seed(0)
    eager = build_adcsr("tiny").eval()
    path = tmp_path / "dyn.pt2"
    export_model(eager, path, "torch-export", 32, dynamic=True, source="tests: tiny seed 0")
    model = load_exported(path)
    assert model.record["min_lr_side"] == 32
    # one block a side failed a guard inside the program; the runtime pads it to two and crops back
    for h, w in ((16, 16), (16, 48), (48, 32)):
        lr = torch.rand(1, 3, h, w) * 2 - 1
        with torch.no_grad():
            sr = model(lr)
            assert sr.shape == (1, 3, 4 * h, 4 * w)
            if min(h, w) >= 32:
                assert (sr - eager(lr)).abs().max() < 1e-3

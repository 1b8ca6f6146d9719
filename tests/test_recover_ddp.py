"""2 processes (torchrun, gloo on CPU) == 1 process with the same global batch.

float64 models: then the only differences come from summation order (DDP all-reduce, batch
split), which Adam amplifies where a gradient is near zero (its first update is lr*g/(|g|+eps):
d(update)/dg = lr/eps there, x1e4 at lr 1e-4), ~10x more each further step. In fp32 that
turns rounding into whole-step (lr) differences, so fp32 runs cannot be compared tightly;
in fp64 three steps at lr 1e-4 stay far below the tolerance (1e-7 = 1e-3 of one step), while a
wrong data split, a missing all-reduce, a scheduler stepped per process or per-rank randomness
differ by ~lr.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, realsr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OUTPUTS = {"stage1": ["decoder.safetensors"], "stage2": ["student.safetensors", "discriminator_trainable.safetensors"]}


@pytest.mark.parametrize("stage", ["stage1", pytest.param("stage2", marks=pytest.mark.slow)])
def test_two_processes_equal_one_process(tmp_path, stage):
    root = realsr()
    # global batch 4: 2 processes x 2 accumulation micro-batches x 1 item, against 1 process x 4 items
    common = ["--steps", "3", "--batch", "4", "--crop", "64", "--every", "3", "--float64", "--lr", "1e-4",
              "--hr", str(root / "HR")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "compress.recover.tiny", stage, "--run-dir", str(tmp_path / "two"), *common,
                          "--accum", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "2 process(es)" in two.stdout + two.stderr

    from compress.recover.tiny import main

    old = torch.get_num_threads()
    try:
        assert main([stage, "--run-dir", str(tmp_path / "one"), *common]) == 0
    finally:
        torch.set_num_threads(old)
    for name in OUTPUTS[stage]:
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == torch.float64
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-7), (name, k, (a[k] - b[k]).abs().max().item())
    if stage == "stage1":  # training moved the weights by far more than that tolerance
        from compress.recover.tiny import tiny_stage1_models

        start = tiny_stage1_models(0).decoder.double().state_dict()
        a = load_file(str(tmp_path / "one" / OUTPUTS[stage][0]))
        assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4
    one_rows = (tmp_path / "one" / "metrics.csv").read_text().splitlines()
    two_rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    rows = 4 + (stage == "stage1")  # header (+ stage 1's step-0 validation) + 3 steps, one row per step (main only)
    assert len(one_rows) == len(two_rows) == rows

import glob
import os

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")
EXPECTED = {"single_gpu": DistributedType.NO, "ddp": DistributedType.MULTI_GPU, "zero2": DistributedType.DEEPSPEED,
            "zero3": DistributedType.DEEPSPEED, "fsdp": DistributedType.FSDP, "cpu_2proc": DistributedType.MULTI_CPU}


def test_every_documented_config_ships():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "*.yaml"))}
    assert names == set(EXPECTED)
    with open(os.path.join(ROOT, "..", "docs", "distributed.md")) as f:
        doc = f.read()
    assert all(f"configs/{n}.yaml" in doc for n in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_reads_each_config(name):
    cfg = load_config_from_file(os.path.join(ROOT, f"{name}.yaml"))
    assert cfg.distributed_type == EXPECTED[name]
    if name in ("zero2", "zero3"):
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])

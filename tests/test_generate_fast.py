"""The generation fast paths (issue 19) keep the images and the manifest: PNGs written by a thread pool
while the next chunk samples, pixels converted to uint8 on the device, and the ``compile`` card option
(its own fingerprint; eager cards keep theirs)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

import bench.generate
from bench.generate import generate_stage
from bench.methods import load_method
from rtdmd.backbones.base import compile_blocks
from rtdmd.images import to_uint8
from rtdmd.sampling import generate
from rtdmd.suites import load_suite


@pytest.fixture
def suite(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt number {i}, a red circle\n" for i in range(7)))
    return load_suite(str(path))


def manifest_bytes(root: Path) -> tuple[bytes, dict[str, str]]:
    text = (root / "manifest.jsonl").read_bytes()
    files = {
        r["file"]: hashlib.sha256((root / r["file"]).read_bytes()).hexdigest()
        for r in map(json.loads, text.splitlines())
    }
    return text, files


def test_the_png_pool_writes_the_manifest_and_files_of_the_sequential_path(tmp_path, suite, monkeypatch):
    """Seven images in chunks of 4 (a padded last chunk), two seeds: the pool's output equals the
    one-thread path byte for byte, and every manifest row's sha256 is its file's."""
    card = dataclasses.replace(load_method("tiny-cps4"), compute_batch=4)
    generate_stage(card, suite, tmp_path / "sequential", seeds=(0, 1), images_per_prompt=1, device="cpu")
    monkeypatch.setattr(bench.generate, "png_workers", lambda device: 3)
    written = []
    original = bench.generate.save_png
    monkeypatch.setattr(bench.generate, "save_png", lambda pixels, path: written.append(path) or original(pixels, path))
    generate_stage(card, suite, tmp_path / "pooled", seeds=(0, 1), images_per_prompt=1, device="cpu")
    assert len(written) == 14
    sequential = manifest_bytes(tmp_path / "sequential" / "tiny-cps4" / "p")
    pooled = manifest_bytes(tmp_path / "pooled" / "tiny-cps4" / "p")
    assert pooled == sequential
    rows = [json.loads(line) for line in sequential[0].splitlines()]
    assert all(sequential[1][r["file"]] == r["sha256"] for r in rows)


def test_a_failing_png_write_in_the_pool_stops_the_stage(tmp_path, suite, monkeypatch):
    monkeypatch.setattr(bench.generate, "png_workers", lambda device: 2)

    def full_disk(pixels, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(bench.generate, "save_png", full_disk)
    with pytest.raises(OSError, match="No space left"):
        generate_stage(load_method("tiny-cps4"), suite, tmp_path, device="cpu")
    assert not (tmp_path / "tiny-cps4" / "p" / "manifest.jsonl").exists()


def test_uint8_output_is_the_cpu_conversion(suite):
    from bench.methods import build_method

    card = load_method("tiny-cps4")
    backbone, net = build_method(card, torch.device("cpu"))
    args = (backbone, net, ["a red circle", "a blue star", "x"], [("s/0", 0), ("s/1", 0), ("s/2", 1)], card.sampler)
    kwargs = dict(run_seed=0, height=card.height, width=card.width, compute_batch=2)
    floats = generate(*args, **kwargs)
    pixels = generate(*args, **kwargs, as_uint8=True)
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, to_uint8(floats))


def test_compile_has_its_own_fingerprint_and_eager_cards_keep_theirs():
    card = load_method("tiny-cps4")
    eager = hashlib.sha256(
        json.dumps(
            {
                k: v
                for k, v in dataclasses.asdict(card).items()
                if k in ("backbone", "transformer", "loras", "sampler", "height", "width", "compute_batch")
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    assert card.fingerprint() == eager  # the fingerprint of every existing run folder is unchanged
    assert dataclasses.replace(card, compile=True).fingerprint() != eager


def test_compile_blocks_wraps_each_repeated_block():
    from bench.methods import build_method

    _, net = build_method(load_method("tiny-cps4"), torch.device("cpu"))
    blocks = len(net.transformer_blocks)
    assert compile_blocks(net) == blocks
    with pytest.raises(ValueError, match="no repeated transformer blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.gelu(self.proj(x)) * 2


def test_compiled_blocks_keep_one_static_graph_per_batch_size():
    """A short chunk (batch 2 after 4) must get its own graph: dynamo's default would recompile the block
    with a symbolic batch and run that graph for every later chunk, changing their kernels and bits."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    net = torch.nn.Module()
    net.transformer_blocks = torch.nn.ModuleList([_Block()])
    compile_blocks(net)
    block = net.transformer_blocks[0]
    x = torch.randn(4, 8)
    first = block(x)
    before = counters["stats"]["unique_graphs"]
    block(torch.randn(2, 8))
    block(torch.randn(3, 8))
    assert counters["stats"]["unique_graphs"] - before == 2  # one static graph for each new size
    assert torch.equal(block(x), first)
    torch._dynamo.reset()

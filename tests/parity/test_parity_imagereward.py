"""``imagereward`` against the reference package ``image-reward==1.5`` (THUDM/ImageReward).

Random weights are made by the reference's own ``ImageReward`` class and saved with its
``state_dict()`` as ``ImageReward.pt`` (so the file has the released key layout), then loaded by the
reference's ``ImageReward.load`` and by ``rtdmd.rewards.imagereward.ImageReward`` from the same files.
Both score the same PIL images and prompts; the scores must agree to 1e-5.

The reference runs unchanged except for what cannot run offline or on current libraries:

* ``init_tokenizer`` reads ``bert-base-uncased`` from the hub; here the same steps read a local
  WordPiece vocabulary (and look ``[ENC]`` up by name: transformers 5 has no
  ``additional_special_tokens_ids``);
* transformers >= 4.56 moved ``apply_chunking_to_forward`` / ``prune_linear_layer`` out of
  ``modeling_utils``, and 5.x dropped ``PreTrainedModel.invert_attention_mask`` / ``get_head_mask``,
  which ``med.py`` calls; they are put back with transformers 4.x's definitions, only when absent;
* the tiny test swaps ``create_vit`` for the reference ``VisionTransformer`` at a small width
  (``vit="large"`` is fixed in ``ImageReward.__init__``); ``test_full_size`` keeps ViT-L/16.

Environments where this passes (Python 3.11, ``torch==2.14.1 torchvision==0.29.1``; run with
``HF_HUB_OFFLINE=1 pytest -m parity tests/parity/test_parity_imagereward.py``):

* the dev stack: rtdmd with its ``rewards`` extra (transformers 5.24, timm 1.0.31), then
  ``pip install fairscale==0.4.13 openai-clip==1.0.1 "setuptools<81"`` and
  ``pip install --no-deps image-reward==1.5`` (it pins timm 0.6.13; ``import clip`` needs
  ``pkg_resources``); the shims above are active. Measured max |ours - reference|: 6e-7 (tiny),
  1.7e-6 (full size);
* the reference's own stack, no shims: ``image-reward==1.5 transformers==4.55.4 timm==0.6.13
  tokenizers==0.21.4 huggingface_hub==0.36.0 diffusers==0.35.2 datasets==3.6.0 openai-clip==1.0.1
  "setuptools<81"`` with rtdmd on ``PYTHONPATH`` (its code then runs on those versions too): 6e-7.
"""

from __future__ import annotations

import json
import string
import time

import numpy as np
import pytest
import torch
from PIL import Image

from rtdmd.rewards import imagereward as ours
from rtdmd.rewards.preprocess import clip_reference

pytestmark = pytest.mark.parity

PROMPTS = [
    "a red cat on a mat",
    "Two DOGS in the rain, at night!",
    "a café with naïve art",
    "猫 and a dog",
    " ".join(["cats and dogs"] * 15),  # past 35 tokens: truncated
]
TOLERANCE = 1e-5


def _v4_invert_attention_mask(self, encoder_attention_mask):
    """transformers 4.x ``ModuleUtilsMixin.invert_attention_mask``: 1 -> 0, 0 -> dtype min."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _v4_get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    """transformers 4.x ``ModuleUtilsMixin.get_head_mask`` for ``head_mask=None`` (all ImageReward passes)."""
    if head_mask is not None:
        raise NotImplementedError("ImageReward never passes a head mask")
    return [None] * num_hidden_layers


def _never_called(*args, **kwargs):
    raise NotImplementedError("head pruning is not used by ImageReward")


def reference_package(tokenizer_dir, monkeypatch):
    """``import ImageReward`` with the compatibility shims above (only where the installed
    transformers lacks the names) and an offline ``init_tokenizer``; undone after the test."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    # med.py imports these from modeling_utils once, at its first import
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            monkeypatch.setattr(modeling_utils, name, getattr(pytorch_utils, name), raising=False)
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        monkeypatch.setattr(modeling_utils, "find_pruneable_heads_and_indices", _never_called, raising=False)
    pretrained = modeling_utils.PreTrainedModel
    if not hasattr(pretrained, "invert_attention_mask"):  # transformers 5.x
        original_init_weights = pretrained.init_weights

        def init_weights(self):  # med.py calls init_weights() without the post_init() that 5.x needs first
            return original_init_weights(self) if hasattr(self, "all_tied_weights_keys") else self.post_init()

        monkeypatch.setattr(pretrained, "invert_attention_mask", _v4_invert_attention_mask, raising=False)
        monkeypatch.setattr(pretrained, "get_head_mask", _v4_get_head_mask, raising=False)
        monkeypatch.setattr(pretrained, "init_weights", init_weights)

    import ImageReward
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from transformers import BertTokenizer

    def init_tokenizer():  # ImageReward.models.BLIP.blip.init_tokenizer, reading a local vocabulary
        tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
        return tokenizer

    monkeypatch.setattr(blip_pretrain, "init_tokenizer", init_tokenizer)
    return ImageReward


def write_vocab(folder, size: int | None = None) -> int:
    """A WordPiece vocabulary in ``folder``. With ``size``, BERT's special tokens sit at
    bert-base-uncased's ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103) and filler
    pieces pad it to ``size``. Returns the token count."""
    letters = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = ["cat", "cats", "dog", "red", "on", "mat", "two", "in", "the", "rain", "at", "night", "and", "art"]
    words += ["with", "cafe", "naive", "猫"]
    pieces = [*letters, *("##" + c for c in letters), *words]
    if size is None:
        tokens = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]
    else:
        tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]
        tokens += [f"piece{i}" for i in range(size - len(tokens))]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return len(tokens)


def med_config(vocab_size: int, tiny: bool) -> dict:
    """BLIP's ``configs/med_config.json`` (BERT-base + cross-attention); ``tiny``: 2 thin layers."""
    config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": 768,
        "add_cross_attention": True,
    }
    if tiny:  # the width stays 768: ImageReward builds MLP(768) whatever the config says
        config |= {"intermediate_size": 96, "num_hidden_layers": 2}
    return config


def unit_gain_(model: torch.nn.Module, seed: int) -> None:
    """Redraw Linear weights ~ N(0, 1/fan_in) and embeddings ~ N(0, 1): the published inits (std
    0.02, head std 1/769) make scores nearly constant, which would hide mismatches."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * module.in_features**-0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
        for name, param in model.named_parameters():
            if name.endswith(("cls_token", "pos_embed")):
                param.copy_(torch.randn(param.shape, generator=generator))


def sample_images(seed: int = 0) -> list[Image.Image]:
    """Smooth colour gradients plus noise at several sizes and aspect ratios (some need no resize)."""
    rng = np.random.default_rng(seed)
    out = []
    for height, width in [(224, 224), (300, 256), (256, 400), (512, 512), (150, 100)]:
        yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
        base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in (0.0, 1.0, 2.0)], -1)
        pixels = 127.5 + 90 * base + rng.normal(0, 20, (height, width, 3))
        out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


def build(tmp_path, monkeypatch, tiny: bool):
    """Weights made and saved by the reference class; returns (reference model, our reward)."""
    tok_dir, model_dir = tmp_path / "bert-base-uncased", tmp_path / "THUDM" / "ImageReward"
    vocab_size = write_vocab(tok_dir, None if tiny else 30522) + 2  # + [DEC], [ENC]
    package = reference_package(tok_dir, monkeypatch)
    if tiny:
        from ImageReward.models.BLIP import blip_pretrain
        from ImageReward.models.BLIP.vit import VisionTransformer

        def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
            # create_vit("large") with width 128 (2 heads of 64) and 2 blocks of 32 px patches
            encoder = VisionTransformer(
                img_size=image_size, patch_size=32, embed_dim=128, depth=2, num_heads=2, drop_path_rate=0.1
            )
            return encoder, 128

        monkeypatch.setattr(blip_pretrain, "create_vit", create_vit)
    model_dir.mkdir(parents=True)
    (model_dir / "med_config.json").write_text(json.dumps(med_config(vocab_size, tiny)))
    torch.manual_seed(0)
    made = package.ImageReward(med_config=str(model_dir / "med_config.json"), device="cpu")
    unit_gain_(made, seed=1)
    torch.save(made.state_dict(), model_dir / "ImageReward.pt")
    del made
    reference = package.load(
        str(model_dir / "ImageReward.pt"), device="cpu", med_config=str(model_dir / "med_config.json")
    )
    return reference, ours.ImageReward(tmp_path)


def compare(reference, reward) -> dict[str, float]:
    """Max |ours - reference| of each path; asserts those that must agree to ``TOLERANCE``."""
    images = sample_images()
    with torch.no_grad():
        expected = torch.tensor([reference.score(p, im) for p, im in zip(PROMPTS, images, strict=True)])
        ranked = torch.tensor(reference.score(PROMPTS[1], images[:3]))  # a list goes through inference_rank
        ids, mask = reward.tokens(PROMPTS, torch.device("cpu"))
        ref_tokens = reference.blip.tokenizer(
            PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        )
        pixels = clip_reference(images)
        gard = reference.score_gard(ids, mask, pixels).squeeze(-1)  # the reference's batched gradient path
        floats = [torch.from_numpy(np.asarray(im)).permute(2, 0, 1)[None].float() / 255 for im in images]
        tensor_path = torch.cat([reward(x, [p]) for x, p in zip(floats, PROMPTS, strict=True)])
    assert torch.equal(ref_tokens.input_ids, ids) and torch.equal(ref_tokens.attention_mask, mask)
    diffs = {
        "score": float((reward.reference(images, PROMPTS) - expected).abs().max()),
        "inference_rank": float((reward.reference(images[:3], [PROMPTS[1]] * 3) - ranked).abs().max()),
        "score_gard": float((reward.from_pixels(pixels, PROMPTS) - gard).abs().max()),
        "tensor path (not asserted)": float((tensor_path - expected).abs().max()),
    }
    print(f"\nimagereward parity: reference scores {[round(x, 4) for x in expected.tolist()]}")
    print(f"  max |ours - reference|: {diffs}")
    assert expected.std() > 1e-2  # the weights make scores depend on image and prompt
    for name in ("score", "inference_rank", "score_gard"):
        assert diffs[name] <= TOLERANCE, (name, diffs)
    return diffs


def test_tiny(tmp_path, monkeypatch):
    reference, reward = build(tmp_path, monkeypatch, tiny=True)
    compare(reference, reward)


@pytest.mark.slow
def test_full_size(tmp_path, monkeypatch):
    """ViT-L/16 + BERT-base with random weights: the released shapes and key layout, end to end
    (about 2 GB of disk for the checkpoint and 8 GB of memory; minutes on 2 cores)."""
    start = time.perf_counter()
    reference, reward = build(tmp_path, monkeypatch, tiny=False)
    assert ours.vit_shape(reward.net.module.state_dict()) == ours.VIT_L16
    assert len(reward.tokenizer) == 30524
    compare(reference, reward)
    print(f"  full-size parity took {time.perf_counter() - start:.0f} s")

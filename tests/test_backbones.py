"""Backbone adapters: packing round trips (invariant 2), model timestep conventions (invariant 3),
LoRA targets on the real classes, guidance rules, resolution checks."""

from __future__ import annotations

import pytest
import torch

from rtdmd.backbones import BACKBONES, BackboneConfig, Cond, build_backbone
from rtdmd.backbones.flux1 import Flux1Backbone, pack_flux1, unpack_flux1
from rtdmd.backbones.flux2 import Flux2Backbone
from rtdmd.backbones.latents import from_tokens, patchify_2x2, to_tokens, unpatchify_2x2
from rtdmd.backbones.sd3 import SD3Backbone
from rtdmd.backbones.tiny import TinyBackbone
from rtdmd.backbones.zimage import ZImageBackbone
from rtdmd.config import ConfigError, from_dict
from rtdmd.testing import tiny_flux1_pipeline, tiny_flux2_klein_pipeline, tiny_sd3_pipeline, tiny_zimage_pipeline


@pytest.fixture(scope="module")
def families():
    return {
        "sd3": SD3Backbone(tiny_sd3_pipeline(), max_sequence_length=16),
        "flux1": Flux1Backbone(tiny_flux1_pipeline(guidance_embeds=True), max_sequence_length=16),
        "flux2": Flux2Backbone(tiny_flux2_klein_pipeline(), max_sequence_length=16),
        "tiny": TinyBackbone.build(),
        "toy": build_backbone(BackboneConfig(family="toy"), torch.device("cpu")),
        "zimage": ZImageBackbone(tiny_zimage_pipeline(), max_sequence_length=16),
    }


def test_every_family_is_registered_and_satisfies_the_protocol(families):
    assert set(BACKBONES.names()) == {"sd3", "flux1", "flux2", "tiny", "toy", "zimage"}
    for name, backbone in families.items():
        assert isinstance(backbone, BACKBONES.get(name))
        for attr in ("encode", "velocity", "decode", "latent_shape", "schedule", "default_timesteps", "lora_targets"):
            assert hasattr(backbone, attr), (name, attr)


# ---------------------------------------------------------------- 2. packing round trips


def test_flux1_pack_round_trip_and_layout():
    x = torch.randn(2, 16, 8, 6)
    tokens = pack_flux1(x)
    assert tokens.shape == (2, 8 * 6 // 4, 64)
    assert torch.equal(unpack_flux1(tokens, 8, 6), x)
    # token (i, j) holds the 2x2 patch at rows 2i..2i+1, cols 2j..2j+1, channel-major
    i, j, c, dy, dx = 1, 2, 5, 1, 0
    assert tokens[0, i * 3 + j, c * 4 + dy * 2 + dx] == x[0, c, 2 * i + dy, 2 * j + dx]


def test_flux1_pack_matches_diffusers_pipeline_packing():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 6)
    torch.testing.assert_close(pack_flux1(x), FluxPipeline._pack_latents(x, 2, 16, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(
        unpack_flux1(pack_flux1(x), 8, 6), FluxPipeline._unpack_latents(pack_flux1(x), 64, 48, 8)
    )


def test_flux2_tokens_and_patchify_round_trip_and_match_diffusers():
    from diffusers import Flux2KleinPipeline

    x = torch.randn(2, 128, 4, 6)
    tokens = to_tokens(x)
    assert tokens.shape == (2, 24, 128)
    assert torch.equal(from_tokens(tokens, 4, 6), x)
    assert torch.equal(tokens, Flux2KleinPipeline._pack_latents(x))
    z = torch.randn(2, 32, 8, 12)
    assert torch.equal(unpatchify_2x2(patchify_2x2(z)), z)
    assert torch.equal(patchify_2x2(z), Flux2KleinPipeline._patchify_latents(z))
    assert torch.equal(unpatchify_2x2(patchify_2x2(z)), Flux2KleinPipeline._unpatchify_latents(patchify_2x2(z)))


def test_latent_shapes(families):
    assert families["sd3"].latent_shape(64, 96) == (16, 8, 12)
    assert families["flux1"].latent_shape(64, 96) == (16, 8, 12)
    assert families["flux2"].latent_shape(64, 96) == (128, 4, 6)
    assert families["tiny"].latent_shape(64, 96) == (48, 16, 24)
    assert families["zimage"].latent_shape(64, 96) == (16, 8, 12)
    for backbone in families.values():
        with pytest.raises(ValueError, match="multiples of"):
            backbone.latent_shape(60, 64)


# ---------------------------------------------------------------- 3. model timestep conventions


@pytest.mark.parametrize(
    ("name", "model_time"),
    [
        ("sd3", lambda s: 1000 * s),
        ("tiny", lambda s: 1000 * s),
        ("flux1", lambda s: s),
        ("flux2", lambda s: s),
        ("zimage", lambda s: 1 - s),
    ],
)
def test_model_timestep_convention(families, name, model_time):
    backbone = families[name]
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["timestep"] if "timestep" in kwargs else args[1]).clone())

    handle = backbone.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        cond = backbone.encode(["a cat", "a dog"])
        x = torch.randn(2, *backbone.latent_shape(32, 32))
        backbone.velocity(backbone.transformer, x, torch.tensor([0.25, 0.8]), cond)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0].float(), model_time(torch.tensor([0.25, 0.8])))


# ---------------------------------------------------------------- guidance


def test_cfg_is_uncond_plus_scale_times_difference(families):
    backbone = families["sd3"]
    x, sigma = torch.randn(2, *backbone.latent_shape(32, 32)), 0.6
    cond = backbone.encode(["a cat", "a dog"], guidance=3.0)
    v_cond = backbone.velocity(backbone.transformer, x, sigma, Cond(cond.tensors))
    v_uncond = backbone.velocity(backbone.transformer, x, sigma, Cond(cond.negative))
    v_cfg = backbone.velocity(backbone.transformer, x, sigma, cond, guidance=3.0)
    torch.testing.assert_close(v_cfg, v_uncond + 3.0 * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unconditional branch"):
        backbone.velocity(backbone.transformer, x, sigma, Cond(cond.tensors), guidance=3.0)


def test_empty_prompt_branch_is_the_encoding_of_the_empty_string(families):
    backbone = families["flux2"]
    cond = backbone.encode(["a cat", "a dog"], guidance=4.0)
    empty = backbone.encode([""]).tensors["prompt_embeds"]
    assert torch.equal(cond.negative["prompt_embeds"], empty.expand(2, -1, -1))


def test_flux1_dev_guidance_is_embedded_not_cfg(families):
    backbone = families["flux1"]
    assert backbone.guidance_embeds and backbone.encode(["a"], guidance=3.5).negative is None
    x = torch.randn(1, *backbone.latent_shape(32, 32))
    cond = backbone.encode(["a"])
    v1, v35 = (backbone.velocity(backbone.transformer, x, 0.5, cond, g) for g in (1.0, 3.5))
    assert not torch.allclose(v1, v35)


def test_distilled_flux2_klein_refuses_guidance():
    backbone = Flux2Backbone(tiny_flux2_klein_pipeline(is_distilled=True), max_sequence_length=16)
    with pytest.raises(ValueError, match="step-distilled"):
        backbone.encode(["a"], guidance=4.0)
    assert backbone.encode(["a"]).negative is None


def test_cond_select_and_to(families):
    cond = families["tiny"].encode(["a", "b", "c"], guidance=2.0)
    picked = cond.select([2, 0])
    assert len(picked) == 2
    assert torch.equal(picked.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][2])
    assert torch.equal(
        cond.select(slice(1, 3)).negative["pooled_prompt_embeds"], cond.negative["pooled_prompt_embeds"][1:3]
    )
    assert len(cond.to("cpu")) == 3


# ---------------------------------------------------------------- LoRA targets and decode


@pytest.mark.parametrize("name", ["sd3", "flux1", "flux2", "tiny", "zimage"])
def test_lora_targets_attach_with_peft(families, name):
    from peft import LoraConfig, get_peft_model

    backbone = families[name]
    import copy

    net = copy.deepcopy(backbone.transformer)
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=list(backbone.lora_targets)))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert wrapped
    if name == "flux2":  # single-block to_out is reached by its full name, the joint to_out.0 by suffix
        assert any(n.endswith("single_transformer_blocks.1.attn.to_out") for n in wrapped)
        assert any(n.endswith("transformer_blocks.0.attn.to_out.0") for n in wrapped)
    if name == "flux1":  # as in the official code, the suffixes also hit the single blocks' q/k/v
        assert any("single_transformer_blocks.0.attn.to_q" in n for n in wrapped)


def test_decode_is_differentiable_and_in_unit_range(families):
    for name in ("sd3", "flux1", "flux2", "tiny", "zimage"):
        backbone = families[name]
        z = torch.randn(1, *backbone.latent_shape(32, 32), requires_grad=True)
        images = backbone.decode(z)
        assert images.shape == (1, 3, 32, 32) and images.dtype == torch.float32
        assert float(images.detach().min()) >= 0 and float(images.detach().max()) <= 1
        images.mean().backward()
        assert z.grad is not None and torch.count_nonzero(z.grad) > 0


def test_tiny_image_codec_round_trip():
    tiny = TinyBackbone.build()
    images = torch.rand(2, 3, 32, 32) * 0.98 + 0.01
    torch.testing.assert_close(tiny.decode(tiny.encode_images(images)), images)


def test_backbone_config_rejects_unknown_family_and_needs_sources():
    with pytest.raises(ConfigError, match="did you mean 'flux1'"):
        from_dict(BackboneConfig, {"family": "flux_1"})
    with pytest.raises(ValueError, match="backbone.source"):
        build_backbone(BackboneConfig(family="sd3"))
    with pytest.raises(ValueError, match="fixed seed"):
        build_backbone(BackboneConfig(family="tiny", source="x"))


@pytest.mark.parametrize(
    ("cls", "build"),
    [
        (SD3Backbone, tiny_sd3_pipeline),
        (Flux1Backbone, tiny_flux1_pipeline),
        (Flux2Backbone, tiny_flux2_klein_pipeline),
    ],
    ids=["sd3", "flux1", "flux2"],
)
def test_bfloat16_weights_give_float32_velocities_close_to_float32(cls, build):
    fp32 = cls(build(), max_sequence_length=16)
    bf16 = cls(build().to(dtype=torch.bfloat16), max_sequence_length=16)
    x = torch.randn(2, *fp32.latent_shape(32, 32))
    with torch.no_grad():
        v32 = fp32.velocity(fp32.transformer, x, 0.7, fp32.encode(["a cat", "a dog"], 2.0), 2.0)
        v16 = bf16.velocity(bf16.transformer, x, 0.7, bf16.encode(["a cat", "a dog"], 2.0), 2.0)
    assert v16.dtype == torch.float32 and torch.isfinite(v16).all()
    assert float((v16 - v32).norm() / v32.norm()) < 0.05
    assert bf16.decode(x).dtype == torch.float32

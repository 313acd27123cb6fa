"""Our adapters + our Euler sampler reproduce diffusers' pipelines on tiny random components.

Each family's pipeline is built from the real diffusers/transformers classes with tiny configs and
local tokenizers, saved with ``save_pretrained`` and loaded back through the adapter's
``from_pretrained`` (no network). Same prompts, same initial latents, same steps: the final latents
and the decoded images must agree to 1e-4 relative error, with and without guidance.
"""

from __future__ import annotations

import pytest
import torch

from rtdmd.backbones.flux1 import Flux1Backbone, pack_flux1, unpack_flux1
from rtdmd.backbones.flux2 import Flux2Backbone
from rtdmd.backbones.latents import unpatchify_2x2
from rtdmd.backbones.sd3 import SD3Backbone
from rtdmd.sampling import rollout, seed_table
from rtdmd.seeding import randn_rows
from rtdmd.testing import tiny_flux1_pipeline, tiny_flux2_klein_pipeline, tiny_sd3_pipeline

PROMPTS = ["a red cube on a table", "two blue spheres"]
HEIGHT = WIDTH = 32
NUM_STEPS = 3
TEXT_LEN = 24


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def ours(backbone, guidance: float):
    """Final latents and images from our adapter + Euler sampler, and the initial latents used."""
    shape = backbone.latent_shape(HEIGHT, WIDTH)
    sigmas = backbone.schedule(NUM_STEPS, HEIGHT, WIDTH)
    seeds = seed_table(7, [(p, 0) for p in PROMPTS], NUM_STEPS)
    cond = backbone.encode(PROMPTS, guidance=guidance)
    traj = rollout(backbone, backbone.transformer, cond, sigmas, seeds, shape, eta=0.0, guidance=guidance, record=False)
    x_init = randn_rows([row[0] for row in seeds], shape)
    with torch.no_grad():
        images = backbone.decode(traj.final)
    return x_init, traj.final, images


def saved(tmp_path_factory, name, pipe):
    path = tmp_path_factory.mktemp(name)
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return saved(tmp_path_factory, "sd3", tiny_sd3_pipeline())


@pytest.fixture(scope="module")
def flux1_dir(tmp_path_factory):
    return saved(tmp_path_factory, "flux1", tiny_flux1_pipeline(guidance_embeds=True))


@pytest.fixture(scope="module")
def flux1_schnell_dir(tmp_path_factory):
    return saved(tmp_path_factory, "flux1s", tiny_flux1_pipeline(guidance_embeds=False))


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    return saved(tmp_path_factory, "flux2", tiny_flux2_klein_pipeline())


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_sd3_matches_stable_diffusion3_pipeline(sd3_dir, guidance):
    from diffusers import StableDiffusion3Pipeline

    backbone = SD3Backbone.from_pretrained(sd3_dir, dtype=torch.float32, max_sequence_length=TEXT_LEN)
    x_init, final, images = ours(backbone, guidance)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, dtype=torch.float32)
    common = dict(
        prompt=PROMPTS,
        num_inference_steps=NUM_STEPS,
        guidance_scale=guidance,
        height=HEIGHT,
        width=WIDTH,
        max_sequence_length=TEXT_LEN,
    )
    ref_latents = pipe(latents=x_init.clone(), output_type="latent", **common).images
    ref_images = pipe(latents=x_init.clone(), output_type="pt", **common).images
    assert rel_err(final, ref_latents) < 1e-4
    assert rel_err(images, ref_images) < 1e-4


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_flux1_dev_matches_flux_pipeline(flux1_dir, guidance):
    """Guidance-distilled FLUX.1: the guidance is the embedded scalar, one pass."""
    from diffusers import FluxPipeline

    backbone = Flux1Backbone.from_pretrained(flux1_dir, dtype=torch.float32, max_sequence_length=TEXT_LEN)
    x_init, final, images = ours(backbone, guidance)
    pipe = FluxPipeline.from_pretrained(flux1_dir, dtype=torch.float32)
    common = dict(
        prompt=PROMPTS,
        num_inference_steps=NUM_STEPS,
        guidance_scale=guidance,
        height=HEIGHT,
        width=WIDTH,
        max_sequence_length=TEXT_LEN,
    )
    ref_packed = pipe(latents=pack_flux1(x_init), output_type="latent", **common).images
    ref_images = pipe(latents=pack_flux1(x_init), output_type="pt", **common).images
    h, w = final.shape[-2:]
    assert rel_err(final, unpack_flux1(ref_packed, h, w)) < 1e-4
    assert rel_err(images, ref_images) < 1e-4


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_flux1_without_guidance_embedding_uses_true_cfg(flux1_schnell_dir, guidance):
    """FLUX.1 without guidance embedding: classical CFG with the empty prompt = FluxPipeline's true CFG."""
    from diffusers import FluxPipeline

    backbone = Flux1Backbone.from_pretrained(flux1_schnell_dir, dtype=torch.float32, max_sequence_length=TEXT_LEN)
    x_init, final, images = ours(backbone, guidance)
    pipe = FluxPipeline.from_pretrained(flux1_schnell_dir, dtype=torch.float32)
    ref_images = pipe(
        prompt=PROMPTS,
        negative_prompt=[""] * len(PROMPTS),
        true_cfg_scale=guidance,
        latents=pack_flux1(x_init),
        num_inference_steps=NUM_STEPS,
        height=HEIGHT,
        width=WIDTH,
        max_sequence_length=TEXT_LEN,
        output_type="pt",
    ).images
    assert rel_err(images, ref_images) < 1e-4


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_flux2_klein_matches_flux2_klein_pipeline(flux2_dir, guidance):
    from diffusers import Flux2KleinPipeline

    backbone = Flux2Backbone.from_pretrained(flux2_dir, dtype=torch.float32, max_sequence_length=TEXT_LEN)
    x_init, final, images = ours(backbone, guidance)
    pipe = Flux2KleinPipeline.from_pretrained(flux2_dir, dtype=torch.float32)
    common = dict(
        prompt=PROMPTS,
        num_inference_steps=NUM_STEPS,
        guidance_scale=guidance,
        height=HEIGHT,
        width=WIDTH,
        max_sequence_length=TEXT_LEN,
    )
    # the pipeline's "latent" output is un-normalised and unpatchified: map ours the same way
    ref_latents = pipe(latents=x_init.clone(), output_type="latent", **common).images
    ref_images = pipe(latents=x_init.clone(), output_type="pt", **common).images
    bn = backbone.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + backbone.vae.config.batch_norm_eps)
    assert rel_err(unpatchify_2x2(final * std + bn.running_mean.view(1, -1, 1, 1)), ref_latents) < 1e-4
    assert rel_err(images, ref_images) < 1e-4

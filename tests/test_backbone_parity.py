"""Our adapters + our Euler sampler reproduce diffusers' pipelines on tiny random components.

Each family's pipeline is built from the real diffusers/transformers classes with tiny configs and
local tokenizers, saved with ``save_pretrained`` and loaded back through the adapter's
``from_pretrained`` (no network). Same prompts, same initial latents, same steps: the final latents
and the decoded images must agree to 1e-4 relative error, with and without guidance.
"""

from __future__ import annotations

import pytest
import torch

from rtdmd.backbones.flux1 import Flux1Backbone, pack_flux1
from rtdmd.backbones.flux2 import Flux2Backbone
from rtdmd.backbones.latents import unpatchify_2x2
from rtdmd.backbones.sd3 import SD3Backbone
from rtdmd.backbones.zimage import ZImageBackbone
from rtdmd.sampling import rollout, seed_table
from rtdmd.seeding import randn_rows
from rtdmd.testing import tiny_flux1_pipeline, tiny_flux2_klein_pipeline, tiny_sd3_pipeline, tiny_zimage_pipeline

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


def flux2_vae_latents(final: torch.Tensor, backbone: Flux2Backbone) -> torch.Tensor:
    """The klein pipeline's "latent" output is un-normalised and unpatchified: map ours the same way."""
    bn = backbone.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + backbone.vae.config.batch_norm_eps)
    return unpatchify_2x2(final * std + bn.running_mean.view(1, -1, 1, 1))


def same(x, *_):
    return x


def packed(x, *_):
    return pack_flux1(x)


# case: (pipeline builder, its kwargs, adapter, our latent -> the pipeline's `latents` input,
#        our final latent -> the pipeline's "latent" output, guidance -> pipeline kwargs)
CASES = {
    "sd3": (tiny_sd3_pipeline, {}, SD3Backbone, same, same, lambda g: {"guidance_scale": g}),
    # guidance-distilled FLUX.1-dev: the guidance is the embedded scalar, one pass
    "flux1-dev": (
        tiny_flux1_pipeline,
        {"guidance_embeds": True},
        Flux1Backbone,
        pack_flux1,
        packed,
        lambda g: {"guidance_scale": g},
    ),
    # FLUX.1 without guidance embedding: classical CFG with "" = FluxPipeline's true CFG
    "flux1-true-cfg": (
        tiny_flux1_pipeline,
        {"guidance_embeds": False},
        Flux1Backbone,
        pack_flux1,
        packed,
        lambda g: {"true_cfg_scale": g, "negative_prompt": [""] * len(PROMPTS)},
    ),
    "flux2-klein-base": (
        tiny_flux2_klein_pipeline,
        {},
        Flux2Backbone,
        same,
        flux2_vae_latents,
        lambda g: {"guidance_scale": g},
    ),
    # Z-Image's pipeline writes CFG as pos + g (pos - neg): our weight w is 1 + g
    "zimage": (tiny_zimage_pipeline, {}, ZImageBackbone, same, same, lambda g: {"guidance_scale": g - 1.0}),
}


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory):
    """Each case's tiny pipeline, saved once with save_pretrained (loaded back by path, offline)."""
    paths: dict[str, str] = {}

    def get(case: str) -> str:
        if case not in paths:
            build, kwargs = CASES[case][:2]
            path = tmp_path_factory.mktemp(case)
            build(**kwargs).save_pretrained(path)
            paths[case] = str(path)
        return paths[case]

    return get


@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("case", list(CASES))
def test_adapter_and_euler_sampler_match_the_diffusers_pipeline(saved_pipelines, case, guidance):
    _, _, adapter, to_pipeline_input, to_pipeline_latent, guidance_kwargs = CASES[case]
    path = saved_pipelines(case)
    backbone = adapter.from_pretrained(path, dtype=torch.float32, max_sequence_length=TEXT_LEN)
    x_init, final, images = ours(backbone, guidance)
    import diffusers

    pipe = getattr(diffusers, adapter.PIPELINE).from_pretrained(path, dtype=torch.float32)
    common = dict(
        num_inference_steps=NUM_STEPS,
        height=HEIGHT,
        width=WIDTH,
        max_sequence_length=TEXT_LEN,
        **guidance_kwargs(guidance),
    )
    # a fresh prompt list per call: ZImagePipeline applies its chat template to the list in place
    ref_latents = pipe(
        prompt=list(PROMPTS), latents=to_pipeline_input(x_init.clone()), output_type="latent", **common
    ).images
    ref_images = pipe(
        prompt=list(PROMPTS), latents=to_pipeline_input(x_init.clone()), output_type="pt", **common
    ).images
    assert rel_err(to_pipeline_latent(final, backbone), ref_latents) < 1e-4
    assert rel_err(images, ref_images) < 1e-4


TDM_SCHEDULER = dict(
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=6.0,
    final_sigmas_type="zero",
    lower_order_final=True,
    euler_at_final=False,
    timestep_spacing="linspace",
    num_train_timesteps=1000,
)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_diffusers_scheduler_sampler_matches_the_pipeline_with_that_scheduler(saved_pipelines, guidance):
    """The TDM-style sampler: DPM-Solver++ (flow) instead of Euler, through our velocity."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusion3Pipeline

    from rtdmd.sampling import SamplerSpec, scheduler_chain

    path = saved_pipelines("sd3")
    backbone = SD3Backbone.from_pretrained(path, dtype=torch.float32, max_sequence_length=TEXT_LEN)
    spec = SamplerSpec(
        num_steps=4, eta=0.0, guidance=guidance, scheduler="DPMSolverMultistepScheduler", scheduler_config=TDM_SCHEDULER
    )
    spec.validate()
    shape = backbone.latent_shape(HEIGHT, WIDTH)
    x_init = randn_rows([row[0] for row in seed_table(3, [(p, 0) for p in PROMPTS], 4)], shape)
    with torch.no_grad():
        ours = scheduler_chain(backbone, backbone.transformer, backbone.encode(PROMPTS, guidance), x_init.clone(), spec)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler(**TDM_SCHEDULER)
    ref = pipe(
        prompt=list(PROMPTS),  # a copy: ZImagePipeline templates its prompt list in place
        latents=x_init.clone(),
        num_inference_steps=4,
        guidance_scale=guidance,
        height=HEIGHT,
        width=WIDTH,
        max_sequence_length=TEXT_LEN,
        output_type="latent",
    ).images
    assert rel_err(ours, ref) < 1e-4

"""Component sizes of the released checkpoints, for random-weight benchmarks at real size.

Values are the released ``config.json`` files' (diffusers ``scripts/convert_flux2_to_diffusers.py``
for the FLUX.2-klein transformers); see each entry's comment. Builders live in ``rtdmd.testing``.
"""

from __future__ import annotations

_VAE_8X = dict(  # the SD3 / FLUX.1 / FLUX.2 VAEs share this trunk
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
)
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    hidden_act="quick_gelu",
    max_position_embeddings=77,
    vocab_size=49408,
)
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
    max_position_embeddings=77,
    vocab_size=49408,
)
T5_XXL = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    vocab_size=32128,
)

SD35_MEDIUM = {  # stabilityai/stable-diffusion-3.5-medium (2.24B transformer parameters + 0.23B pos-embed buffer)
    "transformer": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    ),
    "clip_l": CLIP_L,
    "clip_g": CLIP_G,
    "t5": T5_XXL,
    "vae": _VAE_8X
    | dict(
        latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    ),
    "scheduler": dict(shift=3.0),
}
SD3_MEDIUM = SD35_MEDIUM | {  # stabilityai/stable-diffusion-3-medium-diffusers: no dual attention, no qk-norm
    "transformer": {
        k: v for k, v in SD35_MEDIUM["transformer"].items() if k not in ("qk_norm", "dual_attention_layers")
    }
    | dict(pos_embed_max_size=192),
}
FLUX1_DEV = {  # black-forest-labs/FLUX.1-dev
    "transformer": dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    "clip_l": CLIP_L,
    "t5": T5_XXL,
    "vae": _VAE_8X
    | dict(
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    ),
    "scheduler": dict(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
}
_FLUX2_COMMON = dict(
    patch_size=1,
    in_channels=128,
    attention_head_dim=128,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
_FLUX2_VAE = _VAE_8X | dict(latent_channels=32, use_quant_conv=True, use_post_quant_conv=True)
_FLUX2_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)
FLUX2_KLEIN_4B = {  # black-forest-labs/FLUX.2-klein(-base)-4B: 3.88B transformer, Qwen3-4B text encoder
    "transformer": _FLUX2_COMMON
    | dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680),
    "qwen3": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "vae": _FLUX2_VAE,
    "scheduler": _FLUX2_SCHEDULER,
}
FLUX2_KLEIN_9B = {  # black-forest-labs/FLUX.2-klein(-base)-9B: 9.08B transformer, Qwen3-8B text encoder
    "transformer": _FLUX2_COMMON
    | dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288),
    "qwen3": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "vae": _FLUX2_VAE,
    "scheduler": _FLUX2_SCHEDULER,
}

# config name -> (sizes, pipeline builder in rtdmd.testing, adapter class path, text length)
FAMILIES = {
    "sd3m": (SD3_MEDIUM, "sd3_pipeline", "rtdmd.backbones.sd3:SD3Backbone", 128),
    "sd35m": (SD35_MEDIUM, "sd3_pipeline", "rtdmd.backbones.sd3:SD3Backbone", 128),
    "flux1_dev": (FLUX1_DEV, "flux1_pipeline", "rtdmd.backbones.flux1:Flux1Backbone", 512),
    "flux2_4b": (FLUX2_KLEIN_4B, "flux2_klein_pipeline", "rtdmd.backbones.flux2:Flux2Backbone", 512),
    "flux2_9b": (FLUX2_KLEIN_9B, "flux2_klein_pipeline", "rtdmd.backbones.flux2:Flux2Backbone", 512),
}

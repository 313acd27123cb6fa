"""Random-weight pipelines of the real families, built offline (tokenizers included).

Each builder returns a diffusers pipeline whose components are the *same* classes the real
checkpoints use (``SD3Transformer2DModel``, ``CLIPTextModelWithProjection``, ``T5EncoderModel``,
``FluxTransformer2DModel``, ``Flux2Transformer2DModel``, ``Qwen3ForCausalLM``, the VAEs, the CLIP /
T5 / Qwen2 tokenizers), with sizes given as constructor keyword arguments per component. The
``TINY_*`` sizes make tests run in seconds; ``bench/perf`` passes the released checkpoints' sizes to
measure speed and memory with random weights. Tests save the tiny pipelines with
``save_pretrained`` and load them back through the adapters' ``from_pretrained``, so the loading
path runs with no network. Tokenizers use a byte-level alphabet (no merges), so any prompt tokenizes.
"""

from __future__ import annotations

import string
from typing import Any

import torch

_SPECIALS_QWEN = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# A minimal Qwen3-style chat template: the pipelines call it with add_generation_prompt=True and
# enable_thinking=False, which appends an empty think block as Qwen3's own template does.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer over the 256 byte symbols (each also with the ``</w>`` suffix)."""
    from transformers import CLIPTokenizer

    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer():
    """A T5 unigram tokenizer over printable ASCII (``<pad>``, ``</s>``, ``<unk>`` at ids 0, 1, 2)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(ch, -5.0), ("\u2581" + ch, -4.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def qwen_tokenizer():
    """A Qwen2 byte-level BPE tokenizer with the chat special tokens and a Qwen3-style template."""
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    for token in _SPECIALS_QWEN:
        vocab[token] = len(vocab)
    return Qwen2TokenizerFast(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=131072,
        extra_special_tokens=list(_SPECIALS_QWEN[1:]),
    )


def _clip(cls_name: str, tok, sizes: dict[str, Any]):
    import transformers

    config = transformers.CLIPTextConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **({"vocab_size": len(tok)} | sizes),
    )
    return getattr(transformers, cls_name)(config)


def _t5(tok, sizes: dict[str, Any]):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=0,
        **({"vocab_size": len(tok)} | sizes),
    )
    return T5EncoderModel(config)


def _qwen3_config(tok, sizes: dict[str, Any]):
    from transformers import Qwen3Config

    return Qwen3Config(
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        **({"vocab_size": len(tok)} | sizes),
    )


def _eval(pipe):
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def sd3_pipeline(sizes: dict[str, dict[str, Any]], seed: int = 0):
    """``StableDiffusion3Pipeline`` from component sizes (keys: transformer, clip_l, clip_g, t5, vae, scheduler)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    tok1, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    return _eval(
        StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**sizes["transformer"]),
            vae=AutoencoderKL(**sizes["vae"]),
            text_encoder=_clip("CLIPTextModelWithProjection", tok1, sizes["clip_l"]),
            text_encoder_2=_clip("CLIPTextModelWithProjection", tok2, sizes["clip_g"]),
            text_encoder_3=_t5(tok3, sizes["t5"]),
            tokenizer=tok1,
            tokenizer_2=tok2,
            tokenizer_3=tok3,
            scheduler=FlowMatchEulerDiscreteScheduler(**sizes["scheduler"]),
        )
    )


def flux1_pipeline(sizes: dict[str, dict[str, Any]], seed: int = 0):
    """``FluxPipeline`` from component sizes (keys: transformer, clip_l, t5, vae, scheduler)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tok1, tok2 = clip_tokenizer(), t5_tokenizer()
    return _eval(
        FluxPipeline(
            transformer=FluxTransformer2DModel(**sizes["transformer"]),
            vae=AutoencoderKL(**sizes["vae"]),
            text_encoder=_clip("CLIPTextModel", tok1, sizes["clip_l"]),
            text_encoder_2=_t5(tok2, sizes["t5"]),
            tokenizer=tok1,
            tokenizer_2=tok2,
            scheduler=FlowMatchEulerDiscreteScheduler(**sizes["scheduler"]),
        )
    )


def flux2_klein_pipeline(sizes: dict[str, dict[str, Any]], seed: int = 0, is_distilled: bool = False):
    """``Flux2KleinPipeline`` from component sizes (keys: transformer, qwen3, vae, scheduler). The VAE's
    batch-norm running statistics are randomised so that decoding's un-normalisation is exercised."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    config = _qwen3_config(tok, sizes["qwen3"])
    vae = AutoencoderKLFlux2(**sizes["vae"])
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return _eval(
        Flux2KleinPipeline(
            transformer=Flux2Transformer2DModel(**sizes["transformer"]),
            vae=vae,
            text_encoder=Qwen3ForCausalLM(config),
            tokenizer=tok,
            scheduler=FlowMatchEulerDiscreteScheduler(**sizes["scheduler"]),
            is_distilled=is_distilled,
        )
    )


def zimage_pipeline(sizes: dict[str, dict[str, Any]], seed: int = 0):
    """``ZImagePipeline`` from component sizes (keys: transformer, qwen3, vae, scheduler)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    config = _qwen3_config(tok, sizes["qwen3"])
    return _eval(
        ZImagePipeline(
            transformer=ZImageTransformer2DModel(**sizes["transformer"]),
            vae=AutoencoderKL(**sizes["vae"]),
            text_encoder=Qwen3Model(config),
            tokenizer=tok,
            scheduler=FlowMatchEulerDiscreteScheduler(**sizes["scheduler"]),
        )
    )


# ---------------------------------------------------------------- tiny sizes (tests)

_TINY_VAE = dict(  # four levels, so the VAE scale factor is 8 as in the real VAEs
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    norm_num_groups=2,
    sample_size=32,
)
_TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=3,
    projection_dim=32,
    max_position_embeddings=77,
)
_TINY_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8)

TINY_SD3 = {
    "transformer": dict(
        sample_size=4,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    ),
    "clip_l": _TINY_CLIP,
    "clip_g": _TINY_CLIP,
    "t5": _TINY_T5,
    "vae": _TINY_VAE | dict(latent_channels=16, shift_factor=0.0609, scaling_factor=1.5035),
    "scheduler": dict(shift=3.0),
}


def tiny_flux1_sizes(guidance_embeds: bool) -> dict[str, dict[str, Any]]:
    return {
        "transformer": dict(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=guidance_embeds,
        ),
        "clip_l": _TINY_CLIP,
        "t5": _TINY_T5,
        "vae": _TINY_VAE
        | dict(
            latent_channels=16,
            shift_factor=0.1159,
            scaling_factor=0.3611,
            use_quant_conv=False,
            use_post_quant_conv=False,
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


TINY_FLUX2_KLEIN = {
    "transformer": dict(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    ),
    # 28 layers so that the default hidden-state layers (9, 18, 27) exist; joint dim = 3 x 16
    "qwen3": dict(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
    ),
    "vae": _TINY_VAE | dict(latent_channels=32, use_quant_conv=False, use_post_quant_conv=False),
    "scheduler": dict(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"),
}


TINY_ZIMAGE = {
    "transformer": dict(
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[64, 32, 32],
    ),
    "qwen3": dict(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
    ),
    "vae": _TINY_VAE
    | dict(
        latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False
    ),
    "scheduler": dict(shift=3.0),
}


def tiny_zimage_pipeline(seed: int = 0):
    return zimage_pipeline(TINY_ZIMAGE, seed)


def tiny_sd3_pipeline(seed: int = 0):
    return sd3_pipeline(TINY_SD3, seed)


def tiny_flux1_pipeline(seed: int = 0, guidance_embeds: bool = True):
    return flux1_pipeline(tiny_flux1_sizes(guidance_embeds), seed)


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    return flux2_klein_pipeline(TINY_FLUX2_KLEIN, seed, is_distilled)


TINY_CLIP = {
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "patch_size": 32,
}


def save_tiny_clip(
    model_dir,
    processor_dir=None,
    projection_dim: int = 16,
    seed: int = 0,
    logit_scale: float | None = None,
    sizes: dict[str, Any] = TINY_CLIP,
) -> None:
    """A random ``CLIPModel`` at 224 px (``sizes``: default 2 layers, width 32, patch 32) saved with
    ``save_pretrained`` in ``model_dir``, its byte-level tokenizer and PIL image processor in
    ``processor_dir`` (default: the same folder): the file layout of the hub's CLIP repositories.
    ``bench/perf/rewards.py`` passes the released models' sizes."""
    import transformers

    tok = clip_tokenizer()
    specials = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(tok), "max_position_embeddings": 77, **specials, **sizes["text"]},
        vision_config={"image_size": 224, "patch_size": sizes["patch_size"], **sizes["vision"]},
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(config)
    if logit_scale is not None:
        model.logit_scale.data.fill_(logit_scale)
    model.save_pretrained(model_dir)
    tok.save_pretrained(processor_dir or model_dir)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size=224).save_pretrained(
        processor_dir or model_dir
    )


def param_grads(loss: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
    """``d loss / d p`` for each named parameter (zeros where ``loss`` does not depend on it)."""
    values = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), values, strict=True)}


def assert_same_gradients(ours: dict, expected: dict) -> None:
    """Equal up to float32 rounding: each element within 1e-4 relative, or 1e-4 of the largest element;
    an all-zero expectation is refused (it could not tell a mistake)."""
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 0, "the expected gradient is zero: the check would not see a mistake"
    for name in expected:
        torch.testing.assert_close(ours[name].double(), expected[name].double(), rtol=1e-4, atol=1e-4 * scale)

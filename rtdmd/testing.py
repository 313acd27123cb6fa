"""Tiny random-weight pipelines of the real families, built offline (tokenizers included).

Each builder returns a diffusers pipeline whose components are the *same* classes the real
checkpoints use (``SD3Transformer2DModel``, ``CLIPTextModelWithProjection``, ``T5EncoderModel``,
``FluxTransformer2DModel``, ``Flux2Transformer2DModel``, ``Qwen3ForCausalLM``, the VAEs, the CLIP / T5
/ Qwen2 tokenizers), with tiny sizes and random weights. Tests save them with ``save_pretrained``
and load them back through the adapters' ``from_pretrained``, so the whole loading path runs with no
network. Tokenizers use a byte-level alphabet (no merges), so any prompt tokenizes.
"""

from __future__ import annotations

import string

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


def _clip_config(tok, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=len(tok),
        projection_dim=projection,
        max_position_embeddings=77,
    )


def _t5_encoder(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=0,
        )
    )


def _vae_kwargs(latent_channels: int) -> dict:
    """Four levels, so the VAE scale factor is 8 as in the real VAEs."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=32,
    )


def _eval(pipe):
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def tiny_sd3_pipeline(seed: int = 0):
    """SD3-shaped: 16 latent channels, patch 2, CLIP-L/G (pooled 2 x 32) + T5 (32), VAE x8."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok1, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    return _eval(
        StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(
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
            vae=AutoencoderKL(**_vae_kwargs(16), shift_factor=0.0609, scaling_factor=1.5035),
            text_encoder=CLIPTextModelWithProjection(_clip_config(tok1)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok2)),
            text_encoder_3=_t5_encoder(tok3),
            tokenizer=tok1,
            tokenizer_2=tok2,
            tokenizer_3=tok3,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    )


def tiny_flux1_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """FLUX.1-shaped: 16 latent channels packed 2x2 into 64, CLIP pooled + T5, dynamic shift."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok1, tok2 = clip_tokenizer(), t5_tokenizer()
    return _eval(
        FluxPipeline(
            transformer=FluxTransformer2DModel(
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
            vae=AutoencoderKL(
                **_vae_kwargs(16),
                shift_factor=0.1159,
                scaling_factor=0.3611,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            text_encoder=CLIPTextModel(_clip_config(tok1)),
            text_encoder_2=_t5_encoder(tok2),
            tokenizer=tok1,
            tokenizer_2=tok2,
            scheduler=FlowMatchEulerDiscreteScheduler(
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
        )
    )


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """FLUX.2-klein-shaped: 32 VAE channels patchified to 128 and batch-normalised (random running
    statistics, so decoding's un-normalisation is exercised), Qwen3 with 28 layers so the default
    hidden-state layers (9, 18, 27) exist."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tok),
            max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
    )
    vae = AutoencoderKLFlux2(**_vae_kwargs(32), use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return _eval(
        Flux2KleinPipeline(
            transformer=Flux2Transformer2DModel(
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
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tok,
            scheduler=FlowMatchEulerDiscreteScheduler(
                shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
            ),
            is_distilled=is_distilled,
        )
    )

"""ImageReward on a tiny random network of the same architecture, saved as ``ImageReward.pt`` +
``med_config.json`` and a ``vocab.txt`` tokenizer under a weights root, loaded through the real path."""

import json
import string

import pytest
import torch

from rtdmd.rewards import imagereward as ir
from rtdmd.rewards.base import REWARDS, score
from rtdmd.rewards.preprocess import clip_tensor
from rtdmd.weights import MissingWeights

PROMPTS = ["a red cat on a mat", "two dogs", "A CAFÉ at night, in the rain!", "猫 and a dog"]
TINY_VIT = ir.VitShape(patch_px=32, width=128, depth=2, heads=2, mlp_width=256)  # heads = width / 64
WORDS = ["cat", "dog", "red", "on", "mat", "two", "night", "in", "the", "rain", "and", "at", "cafe", "猫"]


def vocab() -> list[str]:
    """A WordPiece vocabulary: BERT's specials at BERT's positions, letters, suffix letters, words."""
    letters = list(string.ascii_lowercase + string.digits + string.punctuation)
    return ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters), *WORDS]


def tiny_med_config(vocab_size: int) -> dict:
    """BLIP's med_config.json keys with tiny sizes (encoder_width is overridden by the ViT width)."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": 768,
        "add_cross_attention": True,
    }


def save_tiny_imagereward(root, seed: int = 0) -> ir.ImageRewardNet:
    """Write a random tiny ImageReward in the released layout under ``root``; returns the network.
    The checkpoint also holds the keys the reference saves but scoring ignores."""
    words = vocab()
    model_dir, tok_dir = root / ir.MODEL_FILES.repo, root / ir.TOKENIZER_FILES.repo
    model_dir.mkdir(parents=True)
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    med = tiny_med_config(len(words) + 2)  # + [DEC], [ENC]
    (model_dir / ir.MED_CONFIG).write_text(json.dumps(med))
    torch.manual_seed(seed)
    net = ir.ImageRewardNet(med, TINY_VIT).eval()
    with torch.no_grad():  # unit-gain weights: BERT's init (std 0.02) leaves [CLS] nearly blind to text and image
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, module.in_features**-0.5)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0, 1)
    state = dict(net.state_dict())
    state["blip.vision_proj.weight"] = torch.randn(8, TINY_VIT.width)
    state["blip.text_proj.weight"] = torch.randn(8, med["hidden_size"])
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    torch.save(state, model_dir / ir.CHECKPOINT)
    return net


def images(n: int = 4, height: int = 224, width: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return root, save_tiny_imagereward(root)


@pytest.fixture(scope="module")
def reward(saved):
    return ir.ImageReward(saved[0])


def test_registered_with_declared_info_and_files():
    assert REWARDS.get("imagereward") is ir.ImageReward
    info = ir.ImageReward.info
    assert (info.version, info.higher_is_better, info.differentiable) == ("v1.0", True, True)
    assert ir.ImageReward.weights == (
        ir.WeightFiles(repo="THUDM/ImageReward", files=("ImageReward.pt", "med_config.json")),
        ir.WeightFiles(repo="bert-base-uncased", files=("vocab.txt", "tokenizer_config.json")),
    )


def test_loaded_network_is_the_saved_one(saved, reward):
    """Scores through the files equal the saved network on the same inputs, by the published formula."""
    _, net = saved
    x = images()
    ids, mask = reward.tokens(PROMPTS, torch.device("cpu"))
    with torch.no_grad():
        pixels = clip_tensor(x, 224)
        hidden = net.blip.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=net.blip.visual_encoder.forward_features(pixels),
            encoder_attention_mask=torch.ones(4, 50, dtype=torch.long),
        ).last_hidden_state
        expected = (net.mlp.layers(hidden[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    assert torch.allclose(score(reward, x, PROMPTS), expected, atol=1e-6, rtol=0)
    assert ir.vit_shape(net.state_dict()) == TINY_VIT
    with torch.device("meta"):  # shapes only: ViT-L/16 as create_vit("large", 224) builds it
        large = ir.ImageRewardNet(tiny_med_config(8), ir.VIT_L16).state_dict()
    assert ir.vit_shape(large) == ir.VIT_L16 and large["blip.visual_encoder.pos_embed"].shape == (1, 197, 1024)


def test_shapes_batch_invariance_and_pairing(reward):
    x = images()
    batch = score(reward, x, PROMPTS, batch_size=4)
    one_by_one = score(reward, x, PROMPTS, batch_size=1)
    assert batch.shape == (4,) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    assert torch.allclose(batch, one_by_one, atol=1e-5, rtol=0)
    assert batch.std() > 1e-3  # images and prompts change the score
    # image i is scored with prompt i only (no B x B cross product)
    order = [2, 0, 3, 1]
    assert torch.allclose(score(reward, x[order], [PROMPTS[i] for i in order]), batch[order], atol=1e-5, rtol=0)
    other_prompt = score(reward, x, [PROMPTS[0]] * 4)
    assert torch.allclose(other_prompt[0], batch[0], atol=1e-6) and not torch.allclose(other_prompt[1:], batch[1:])


def test_gradient_reaches_the_image(reward):
    x = images(2, 256, 320).requires_grad_(True)
    reward(x, PROMPTS[:2], [{}, {}]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.net.module.parameters())


def test_tokens_match_blip_and_the_reference_slow_tokenizer(reward):
    """35 ids, [CLS] first (ImageReward does not swap in [ENC]), truncation, [DEC]/[ENC] appended
    to the vocabulary, and the fast WordPiece tokenizer equals the Python one ImageReward ran."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    tok = reward.tokenizer
    n = len(vocab())
    assert (tok.convert_tokens_to_ids("[DEC]"), tok.convert_tokens_to_ids("[ENC]"), tok.bos_token_id) == (n, n + 1, n)
    prompts = [
        *PROMPTS,
        "tab\tnew\nline  spaces",
        "naïve résumé  Ünïcödé",
        "control\x00\x07chars and emoji 🐱",
        "hy-phen, comma; [ENC] literal [dec]",
        " ".join(["cats"] * 40),
    ]
    ids, mask = reward.tokens(prompts, torch.device("cpu"))
    assert ids.shape == mask.shape == (len(prompts), ir.MAX_TOKENS)
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert ids[-1, -1] == tok.sep_token_id and mask[-1].all()  # the long prompt is truncated to 35
    assert ((ids == tok.pad_token_id) == (mask == 0)).all()
    slow = BertTokenizerLegacy.from_pretrained(tok.name_or_path)
    slow.add_special_tokens({"bos_token": "[DEC]"})
    slow.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    slow_ids = slow(prompts, padding="max_length", truncation=True, max_length=ir.MAX_TOKENS, return_tensors="pt")
    assert torch.equal(slow_ids.input_ids, ids) and torch.equal(slow_ids.attention_mask, mask)


def test_padding_is_masked(saved):
    """A new [PAD] embedding leaves the scores unchanged; a new embedding of a word the prompt uses
    changes its score (and only its score). The perturbations are random vectors, not uniform shifts,
    which BERT's embedding LayerNorm would remove."""
    reward = ir.ImageReward(saved[0])
    x = images(2)
    prompts = PROMPTS[:2]  # "a red cat on a mat", "two dogs": both padded to 35 tokens
    ids, mask = reward.tokens(prompts, torch.device("cpu"))
    assert (mask == 0).sum(dim=1).min() > 20  # the padding is there to be masked
    before = score(reward, x, prompts)
    embeddings = reward.net.module.blip.text_encoder.embeddings.word_embeddings.weight
    noise = torch.randn(2, embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeddings[reward.tokenizer.pad_token_id] += 3 * noise[0]
        assert torch.allclose(score(reward, x, prompts), before, atol=1e-6, rtol=0)
        embeddings[reward.tokenizer.convert_tokens_to_ids("cat")] += 3 * noise[1]
        after = score(reward, x, prompts)
    assert (after[0] - before[0]).abs() > 1e-2  # the cat prompt's score moved
    assert torch.allclose(after[1], before[1], atol=1e-6, rtol=0)  # "two dogs" has no cat


def test_reference_path_and_bf16(saved, reward):
    x = images(4, 224, 224)
    tensor = score(reward, x, PROMPTS)
    # 224 px: neither path resizes, so they differ only by the reference's uint8 rounding
    on_grid = (x * 255).round() / 255
    assert torch.allclose(reward.reference(on_grid, PROMPTS), score(reward, on_grid, PROMPTS), atol=1e-5, rtol=0)
    uint8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(reward.reference(uint8, PROMPTS), reward.reference(x, PROMPTS))
    # off the 224 grid: PIL's bicubic filter on uint8 vs torchvision's on floats; measured, bounded
    y = images(4, 300, 256, seed=1)
    gap = (reward.reference(y, PROMPTS) - score(reward, y, PROMPTS)).abs().max()
    print(f"imagereward tiny: |reference - tensor| max {float(gap):.2e} at 300x256")
    assert 0 < gap < 0.05 * max(1.0, float(tensor.abs().max()))
    half = ir.ImageReward(saved[0], dtype="bfloat16")
    assert half.net.dtype == torch.bfloat16
    assert torch.allclose(score(half, x, PROMPTS), tensor, atol=0.1 * max(1.0, float(tensor.abs().max())))


def test_checkpoint_must_hold_every_scoring_weight(tmp_path, saved):
    root, _ = saved
    state = torch.load(root / ir.MODEL_FILES.repo / ir.CHECKPOINT, weights_only=True)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ir.MED_CONFIG).write_text((root / ir.MODEL_FILES.repo / ir.MED_CONFIG).read_text())
    torch.save({k: v for k, v in state.items() if k != "mlp.layers.7.bias"}, folder / ir.CHECKPOINT)
    with pytest.raises(RuntimeError, match="mlp.layers.7.bias"):
        ir.load_net(folder)
    # keys outside the scoring network are ignored, as the reference's strict=False load does
    torch.save(state | {"blip.itm_head.weight": torch.zeros(2)}, folder / ir.CHECKPOINT)
    assert (
        ir.load_net(folder).state_dict().keys()
        == ir.ImageRewardNet(json.loads((folder / ir.MED_CONFIG).read_text()), TINY_VIT).state_dict().keys()
    )


def test_missing_weights_name_the_files_and_the_command(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RTDMD_WEIGHTS", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeights) as error:
        ir.ImageReward(tmp_path / "empty")
    message = str(error.value)
    for needed in ("ImageReward.pt", "med_config.json", "vocab.txt", "rtdmd-bench weights fetch imagereward"):
        assert needed in message

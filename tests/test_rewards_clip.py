"""CLIPScore, LAION aesthetic and PickScore on tiny random CLIPs saved in the hub repositories' layout."""

import math

import pytest
import torch

from rtdmd.rewards import clip as clip_rewards
from rtdmd.rewards.base import REWARDS, score
from rtdmd.testing import save_tiny_clip
from rtdmd.weights import MissingWeights, WeightFiles, resolve

PROMPTS = ["a photo of a cat", "a red cube on a table", "two dogs", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    save_tiny_clip(root / "openai/clip-vit-large-patch14", projection_dim=768, seed=1, logit_scale=math.log(100))
    save_tiny_clip(
        root / "yuvalkirstain/PickScore_v1", root / "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", seed=2, logit_scale=3.0
    )
    mlp = clip_rewards.aesthetic_mlp()
    with torch.no_grad():  # unit-gain weights: the default init shrinks each layer, leaving scores ~constant
        for layer in mlp:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, layer.in_features**-0.5, generator=torch.Generator().manual_seed(3))
    (root / "urls").mkdir()
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, root / "urls" / "mlp.pth")
    return root


@pytest.fixture(scope="module")
def unpinned_mlp():
    """The aesthetic MLP file of the fixture (random weights: not the published sha256)."""
    spec = WeightFiles(url="https://example.invalid/mlp.pth")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clip_rewards.Aesthetic, "weights", (clip_rewards.CLIP_L14, spec))
        yield


def images(n: int = 4, size: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def rewards(root, unpinned_mlp):
    return {
        "clipscore": clip_rewards.ClipScore(root),
        "aesthetic": clip_rewards.Aesthetic(root),
        "pickscore": clip_rewards.PickScore(root),
    }


def test_registered_with_declared_units_and_direction():
    for name in ("clipscore", "aesthetic", "pickscore"):
        info = REWARDS.get(name).info
        assert info.higher_is_better and info.differentiable and info.units


@pytest.mark.parametrize("name", ["clipscore", "aesthetic", "pickscore"])
def test_shapes_batch_invariance_and_gradients(rewards, name):
    reward, x = rewards[name], images()
    batch = score(reward, x, PROMPTS, batch_size=4)
    one_by_one = score(reward, x, PROMPTS, batch_size=1)
    assert batch.shape == (4,) and torch.isfinite(batch).all()
    assert torch.allclose(batch, one_by_one, atol=1e-5, rtol=0)
    x = x.clone().requires_grad_(True)
    reward(x, PROMPTS, [{}] * 4).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["clipscore", "aesthetic", "pickscore"])
def test_tensor_and_reference_paths_agree_closely_and_bf16_runs(root, rewards, name, unpinned_mlp):
    reward, x = rewards[name], images(size=224)
    x = (x * 255).round() / 255  # on the uint8 grid
    tensor = score(reward, x, PROMPTS)
    reference = reward.reference(x, PROMPTS)
    spread = float(reference.max() - reference.min())
    print(
        f"{name}: scores {reference.tolist()}, |tensor - reference| max {float((tensor - reference).abs().max()):.2e}"
    )
    assert spread > 1e-2 * float(reference.abs().max())  # images and prompts move the score
    # 224 px inputs on the uint8 grid need no resize and no rounding: the two paths agree to float32 noise
    torch.testing.assert_close(tensor, reference, rtol=1e-4, atol=1e-4 * spread)
    # the reference path of uint8 pixels equals that of the float images they come from
    uint8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(reward.reference(uint8, PROMPTS), reference)
    half = type(reward)(root, dtype="bfloat16")
    assert next(half.clip.net.module.parameters()).dtype == torch.bfloat16
    bf16 = score(half, x, PROMPTS)
    print(f"{name}: |bf16 - float32| max {float((bf16 - tensor).abs().max()):.2e}, spread {spread:.2e}")
    assert not torch.equal(bf16, tensor) and (bf16 - tensor).abs().max() < 0.1 * spread


def _hf_logits(folder, processor_folder, x):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(processor_folder)
    pixels = CLIPImageProcessorPil.from_pretrained(processor_folder)(
        images=clip_rewards.to_pil(x), return_tensors="pt"
    ).pixel_values
    text = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        return model(pixel_values=pixels, **text).logits_per_image.diagonal()


def test_clipscore_is_transformers_logits_over_100(root, rewards):
    x = images(size=160)
    folder = root / "openai/clip-vit-large-patch14"
    expected = _hf_logits(folder, folder, x) / 100  # the tiny model's logit scale is ln 100, as OpenAI's
    assert torch.allclose(rewards["clipscore"].reference(x, PROMPTS), expected, atol=1e-5)


def test_pickscore_is_the_model_cards_pre_softmax_logit_and_div26_divides(root, rewards, unpinned_mlp):
    x = images(size=160)
    expected = _hf_logits(root / "yuvalkirstain/PickScore_v1", root / "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", x)
    raw = rewards["pickscore"].reference(x, PROMPTS)
    assert torch.allclose(raw, expected, atol=1e-4)
    div = clip_rewards.PickScore(root, scale="div26").reference(x, PROMPTS)
    assert torch.allclose(div * 26, raw, atol=1e-4)
    with pytest.raises(ValueError, match="scale"):
        clip_rewards.PickScore(root, scale="x100")


def test_aesthetic_is_the_mlp_of_the_normalised_embedding_and_ignores_prompts(root, rewards):
    from transformers import CLIPModel

    x = images(size=224)
    model = CLIPModel.from_pretrained(root / "openai/clip-vit-large-patch14").eval()
    pixels = clip_rewards.clip_reference(x)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
        expected = rewards["aesthetic"].mlp.module(features / features.norm(dim=-1, keepdim=True)).squeeze(-1)
    got = rewards["aesthetic"].reference(x, PROMPTS)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got, rewards["aesthetic"].reference(x, ["", "", "", ""]))


def test_missing_weights_name_every_file_and_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(clip_rewards.Aesthetic, "weights", (clip_rewards.CLIP_L14, clip_rewards.AESTHETIC_MLP))
    with pytest.raises(MissingWeights) as error:
        clip_rewards.Aesthetic(tmp_path / "empty")
    message = str(error.value)
    for name in (*clip_rewards.CLIP_L14.files, "sac+logos+ava1-l14-linearMSE.pth"):
        assert name in message
    assert "rtdmd-bench weights fetch aesthetic --weights-dir" in message


def test_a_url_file_with_the_wrong_sha256_is_refused(root):
    spec = WeightFiles(url="https://example.invalid/mlp.pth", sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        resolve("aesthetic", spec, root)

"""The real GenEval metric without mmdet or downloads: the colour classifier on a tiny random
QuickGELU CLIP, the client/worker protocol against a fake worker that speaks it (and encodes with the
real worker's code), the registered rewards end to end on that fake worker, the official summary
text, and the messages for missing weights and a missing detector environment."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from geneval_stand_ins import FixedOutputs
from PIL import Image

from rtdmd.geneval import client as client_module
from rtdmd.geneval.client import DetectorClient, DetectorError, MissingDetectorEnv, default_python, worker_command
from rtdmd.geneval.judge import COLORS, Detection, Verdict, crop_for_color
from rtdmd.geneval.summary import main as summary_main
from rtdmd.geneval.summary import read_results, result_row, summary, write_results, write_summary
from rtdmd.geneval.worker import CHECKPOINT_URL
from rtdmd.rewards import geneval_real  # noqa: F401  (registers geneval, geneval-strict, geneval-partial)
from rtdmd.rewards.base import REWARDS
from rtdmd.weights import MissingWeights

CKPT_NAME = "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco_20220504_001756-c9d0c4f2.pth"

# ---------------------------------------------------------------- colour classifier

TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 56},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """``(model, val_preprocess, tokenizer)`` of a random open_clip CLIP shaped like ViT-L-14-quickgelu
    (QuickGELU, 77-token SimpleTokenizer, 224 px), built by open_clip's factory from a custom config."""
    import open_clip

    folder = tmp_path_factory.mktemp("clipcfg")
    (folder / "rtdmd-tiny-quickgelu.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("rtdmd-tiny-quickgelu")
    return model, preprocess, open_clip.get_tokenizer("ViT-L-14-quickgelu")


class RecordingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return self.tokenizer(texts)


def test_zero_shot_head_uses_the_three_official_templates_per_colour(tiny_clip):
    from rtdmd.geneval.colour import ClipColorClassifier

    model, _, tokenizer = tiny_clip
    recorder = RecordingTokenizer(tokenizer)
    head = ClipColorClassifier(model, recorder).head("traffic light")
    assert head.shape == (16, 10)
    assert recorder.calls == [
        [f"a photo of a {c} traffic light", f"a photo of a {c}-colored traffic light", f"a photo of a {c} object"]
        for c in COLORS
    ]
    # w_c = normalize(mean_t normalize(E(t))), by hand
    with torch.no_grad():
        for j, texts in enumerate(recorder.calls):
            e = model.encode_text(tokenizer(texts))
            w = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            torch.testing.assert_close(head[:, j], w / w.norm())
    torch.testing.assert_close(head.norm(dim=0), torch.ones(10))


def test_colour_logits_and_prediction(tiny_clip):
    from rtdmd.geneval.colour import ClipColorClassifier, val_preprocess

    model, preprocess, tokenizer = tiny_clip
    rng = np.random.default_rng(0)
    crops = [Image.fromarray(rng.integers(0, 256, (20 + i, 31 - i, 3), dtype=np.uint8)) for i in range(20)]
    clf = ClipColorClassifier(model, tokenizer)
    # the classifier's preprocess is open_clip's validation transform
    for crop in crops[:3]:
        assert torch.equal(clf.preprocess(crop), preprocess(crop))
        assert torch.equal(val_preprocess(model)(crop), preprocess(crop))
    logits = clf.logits(crops, "car")
    with torch.no_grad():
        f = model.encode_image(torch.stack([preprocess(c) for c in crops]))
        expected = 100 * (f / f.norm(dim=-1, keepdim=True)) @ clf.head("car")
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    predicted = clf(crops, "car")
    assert predicted == [COLORS[i] for i in expected.argmax(1).tolist()]
    assert set(predicted) <= set(COLORS) and len(predicted) == 20
    # batches of 16 (20 crops: 16 + 4) give the per-crop result
    single = ClipColorClassifier(model, tokenizer, batch_size=1).logits(crops, "car")
    torch.testing.assert_close(logits, single, rtol=1e-5, atol=1e-4)
    assert clf.logits([], "car").shape == (0, 10)
    # many calls at once, batches across call boundaries (3 + 3 + 2 crops): each call's own answers
    requests = [(crops[:2], "car"), ([], "dog"), (crops[2:6], "dog"), (crops[6:8], "car")]
    many = ClipColorClassifier(model, tokenizer, batch_size=3)
    for got, (c, cls) in zip(many.logits_many(requests), requests, strict=True):
        torch.testing.assert_close(got, clf.logits(c, cls), rtol=1e-5, atol=1e-4)
    assert many.classify_many(requests) == [clf(c, cls) for c, cls in requests]


def test_gelu_clip_is_refused(tiny_clip):
    import open_clip

    from rtdmd.geneval.colour import ClipColorClassifier

    gelu = open_clip.create_model("rtdmd-tiny-quickgelu", force_quick_gelu=False)
    for module in gelu.modules():  # the factory keeps the config's QuickGELU: swap it out
        for name, child in module.named_children():
            if type(child).__name__ == "QuickGELU":
                setattr(module, name, torch.nn.GELU())
    with pytest.raises(ValueError, match="QuickGELU"):
        ClipColorClassifier(gelu, tiny_clip[2])


def test_crop_is_the_object_over_grey_999_cropped_with_pil_rounding():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    mask = np.zeros((7, 9), dtype=bool)
    mask[1:5, 2:6] = True
    mask[3, 7] = True
    # PIL rounds half to even: (1.5, 0.5, 6.5, 4.6) -> (2, 0, 6, 5)
    crop = crop_for_color(Image.fromarray(pixels), Detection("cat", (1.5, 0.5, 6.5, 4.6), 0.9, mask))
    expected = np.where(mask[..., None], pixels, np.uint8(153))[0:5, 2:6]
    assert crop.size == (4, 5)
    np.testing.assert_array_equal(np.asarray(crop), expected)
    # without a mask the crop is the plain image
    plain = crop_for_color(Image.fromarray(pixels), Detection("cat", (1.5, 0.5, 6.5, 4.6), 0.9))
    np.testing.assert_array_equal(np.asarray(plain), pixels[0:5, 2:6])


# ---------------------------------------------------------------- client / worker protocol

FAKE_WORKER = """
import json, os, sys, time
sys.path.insert(0, {worker_dir!r})
import numpy as np
from PIL import Image
import worker

args = dict(a.split("=", 1) for a in sys.argv[1:])
mode, log = args.get("mode", "ok"), args.get("log")
if mode == "die-at-start":
    sys.stderr.write("fatal: cannot load the model\\n")
    sys.exit(2)
out = worker.protocol_stdout()
print("noise a library prints")  # must land on stderr, not in the protocol
if mode == "garbage":
    out.write("this is not json\\n"); out.flush(); time.sleep(60)

def reply(message):
    out.write(json.dumps(message) + "\\n"); out.flush()

def run(path, min_score):
    # one detection per image telling what the worker read: label = R, score = G / 255, mask = B > 127
    px = np.asarray(Image.open(path).convert("RGB"))
    if mode == "fail" and px[0, 0, 0] == 255:
        raise RuntimeError("cannot detect in " + path)
    h, w = px.shape[:2]
    masks = np.stack([px[..., 2] > 127, np.zeros((h, w), bool)])
    return worker.encode([[0, 0, w, h], [1, 2, 3, 4]], [px[0, 0, 1] / 255, 0.25], [px[0, 0, 0] % 80, 1], masks, min_score)

def requests():
    for n, request in enumerate(worker.requests_from(sys.stdin), 1):
        if log:
            with open(log, "a") as handle:
                handle.write(f"{{len(request.get('images', []))}}\\n")
        if mode == "crash" and n == 2:
            sys.stderr.write("boom: simulated crash\\n"); sys.stderr.flush(); os._exit(3)
        if mode == "hang":
            time.sleep(60)
        yield request

reply({{"event": "ready", "classes": ["c%d" % i for i in range(80)]}})
worker.serve(run, requests(), reply)
"""


@pytest.fixture
def fake_worker(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER.format(worker_dir=str(client_module.WORKER.parent)))

    def command(mode: str = "ok", log: Path | None = None) -> list[str]:
        return [sys.executable, "-u", str(script), f"mode={mode}"] + ([f"log={log}"] if log else [])

    return command


def image(r: int, g: int, h: int = 12, w: int = 10) -> np.ndarray:
    """RGB uint8 with top-left (r, g, .) and blue > 127 in the left half."""
    px = np.zeros((h, w, 3), dtype=np.uint8)
    px[0, 0, :2] = r, g
    px[:, : w // 2, 2] = 200
    return px


def test_client_round_trips_detections_in_batches(fake_worker, tmp_path):
    log = tmp_path / "requests.log"
    images = [image(15 + i, 100 + 20 * i, h=12 + i) for i in range(5)]
    with DetectorClient(fake_worker(log=log), batch_size=2) as client:
        assert client.ready["event"] == "ready" and len(client.classes) == 80
        found = client.detect(images)
        assert log.read_text().split() == ["2", "2", "1"]  # requests of batch_size images
        for i, (f, px) in enumerate(zip(found, images, strict=True)):
            h, w = px.shape[:2]
            assert len(f) == 2 and f.boxes.dtype == np.float32 and f.labels.dtype == np.int64
            np.testing.assert_array_equal(f.boxes, [[0, 0, w, h], [1, 2, 3, 4]])
            np.testing.assert_array_equal(f.labels, [15 + i, 1])
            np.testing.assert_allclose(f.scores, [np.float32((100 + 20 * i) / 255), 0.25])
            assert f.masks.shape == (2, h, w) and f.masks.dtype == bool
            np.testing.assert_array_equal(f.masks[0], px[..., 2] > 127)
            assert not f.masks[1].any()
        assert client.detect([]) == []
    assert client.proc.returncode == 0 and not client.workdir.exists()


def test_min_score_is_applied_by_the_worker(fake_worker):
    with DetectorClient(fake_worker(), min_score=0.3) as client:
        kept, empty = client.detect([image(3, 200), image(3, 50)])
    np.testing.assert_array_equal(kept.labels, [3])  # 0.25 <= 0.3 dropped
    assert len(empty) == 0 and empty.masks.shape == (0, 12, 10) and empty.boxes.shape == (0, 4)


def test_worker_crash_reports_exit_code_and_stderr(fake_worker):
    client = DetectorClient(fake_worker("crash"), batch_size=1)
    client.detect([image(1, 200)])
    with pytest.raises(DetectorError, match=r"(?s)exited with code 3.*boom: simulated crash") as error:
        client.detect([image(2, 200)])
    assert "noise a library prints" in str(error.value)  # library output went to stderr
    client.close()


def test_worker_failure_on_a_batch_is_reported_and_the_worker_keeps_serving(fake_worker):
    with DetectorClient(fake_worker("fail")) as client:
        with pytest.raises(DetectorError, match="(?s)failed on batch 0.*RuntimeError: cannot detect in"):
            client.detect([image(255, 200)])
        assert client.detect([image(4, 200)])[0].labels[0] == 4


def test_worker_startup_failure_garbage_and_timeout(fake_worker):
    with pytest.raises(DetectorError, match=r"(?s)stopped before answering \(start\).*code 2.*cannot load the model"):
        DetectorClient(fake_worker("die-at-start"))
    with pytest.raises(DetectorError, match="not JSON.*this is not json"):
        DetectorClient(fake_worker("garbage"))
    client = DetectorClient(fake_worker("hang"), batch_timeout_s=0.5)
    with pytest.raises(DetectorError, match="did not answer within 0.5 s"):
        client.detect([image(1, 200)])
    assert client.proc.poll() is not None  # killed, not left behind
    with pytest.raises(DetectorError, match="cannot start"):
        DetectorClient(["/nonexistent/python"])


def test_real_worker_refuses_an_environment_without_mmdet():
    """The real worker under the main environment's python: a clear message, not a traceback soup."""
    with pytest.raises(DetectorError, match="cannot import mmdet/mmcv.*tox -e geneval-mmdet"):
        DetectorClient(worker_command(sys.executable, "x.pth", device="cpu"))


def test_real_worker_needs_a_checkpoint_unless_told_random_weights_for_tests():
    from rtdmd.geneval.worker import build_model

    with pytest.raises(ValueError, match=f"(?s){CKPT_NAME}.*{CHECKPOINT_URL}.*--random-weights-for-tests"):
        build_model("cfg", None, None, "cpu")
    with pytest.raises(FileNotFoundError, match=f"missing.pth does not exist.*{CHECKPOINT_URL}"):
        build_model("cfg", "missing.pth", None, "cpu")
    cmd = worker_command("py", "c.pth", device="cuda:0", random_weights_for_tests=3, threads=2)
    assert cmd[:3] == ["py", "-u", str(client_module.WORKER)]
    assert " ".join(cmd[3:]) == "--device cuda:0 --checkpoint c.pth --random-weights-for-tests 3 --threads 2"


# ---------------------------------------------------------------- the registered rewards


class RedClassifier:
    def __init__(self):
        self.calls = []

    def __call__(self, crops, classname):
        self.calls.append(([c.size for c in crops], classname))
        return ["red"] * len(crops)


class WidthClassifier:
    """Colour by crop width (even: red, odd: blue), so an answer given to the wrong crop shows."""

    def __init__(self):
        self.calls, self.batched = 0, []

    def __call__(self, crops, classname):
        self.calls += 1
        return ["red" if c.size[0] % 2 == 0 else "blue" for c in crops]

    def classify_many(self, requests):
        self.batched.append([len(crops) for crops, _ in requests])
        return [self(crops, cls) for crops, cls in requests]


def test_batched_colours_give_the_per_image_verdicts_in_one_classifier_call(fake_worker):
    from rtdmd.rewards.geneval_real import GenEvalScorer

    px = [image(15, 200, h=12, w=w) for w in (10, 11, 12, 13)] + [image(15, 200)]  # one cat each, crop width w
    meta = [
        {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": c}]} for c in ("red", "red", "blue", "blue")
    ]
    meta.append({"tag": "single_object", "include": [{"class": "dog", "count": 1}]})  # asks no colour
    verdicts, colours = {}, {}
    for batch in (False, True):
        colours[batch] = WidthClassifier()
        with DetectorClient(fake_worker(), min_score=0.3) as client:
            out = GenEvalScorer(client, colours[batch], batch_colours=batch).evaluate(px, meta)
        verdicts[batch] = [(v.correct, v.strict_correct, v.partial) for v, _ in out]
    assert verdicts[True] == verdicts[False]
    assert [v[0] for v in verdicts[False]] == [True, False, False, True, False]
    assert colours[False].calls == 4 and colours[True].batched == [[1, 1, 1, 1]]
    with pytest.raises(ValueError, match="classify_many"):
        GenEvalScorer(SimpleNamespace(classes=[]), RedClassifier(), batch_colours=True)


def test_geneval_rewards_on_the_fake_detector(fake_worker, tmp_path):
    from rtdmd.rewards.geneval_real import GenEvalScorer

    log = tmp_path / "requests.log"
    colour = RedClassifier()
    scorer = GenEvalScorer(DetectorClient(fake_worker(log=log), min_score=0.3), colour)
    # float images whose uint8 pixels (round half to even) give label R = 15 "cat", score G/255 = 128/255
    px = np.stack([image(15, 128, h=12, w=10)] * 3)
    images = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255
    images[:, 1, 0, 0] = 0.5019  # 127.99 -> 128
    meta = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
        {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "blue"}], "prompt": "a blue cat"},
    ]
    official = REWARDS.get("geneval")(scorer=scorer)(images, [m["prompt"] for m in meta], meta)
    assert official.tolist() == [1.0, 0.0, 0.0] and official.dtype == torch.float32
    assert colour.calls == [([(10, 12)], "cat")]  # the crop of the cat's box, classified as a cat
    strict = REWARDS.get("geneval-strict")(scorer=scorer)(images, [""] * 3, meta)
    partial = REWARDS.get("geneval-partial")(scorer=scorer)(images, [""] * 3, meta)
    assert strict.tolist() == [1.0, 0.0, 0.0]
    assert partial.tolist() == [1.0, 0.0, 0.5]  # count right (1), colour wrong (0)
    assert log.read_text().split() == ["3"]  # one detection request for the three variants
    scorer.forget()
    REWARDS.get("geneval")(scorer=scorer)(images[:1], [""], meta[:1])
    assert log.read_text().split() == ["3", "1"]  # forgotten: detected again
    ((verdict, details),) = scorer.evaluate(px[:1], meta[:1])
    assert verdict.correct and details == {"cat": [[0.0, 0.0, 10.0, 12.0, pytest.approx(128 / 255)]]}
    for name in ("geneval", "geneval-strict", "geneval-partial"):
        reward = REWARDS.get(name)
        assert reward.info.aggregate == "category_mean" and reward.info.needs == ("tag", "include")
        assert not reward.info.differentiable and reward.info.higher_is_better
        assert [w.names[0] for w in reward.weights] == [CKPT_NAME, "open_clip_model.safetensors"]
    with pytest.raises(ValueError, match="3 images but 1 metadata rows"):
        scorer.evaluate(px, meta[:1])
    scorer.close()


def test_classnames_are_genevals_80_in_mmdet_order():
    from rtdmd.geneval.judge import CLASSNAMES

    assert len(set(CLASSNAMES)) == 80
    assert CLASSNAMES[:3] == ("person", "bicycle", "car") and CLASSNAMES[-1] == "toothbrush"
    assert CLASSNAMES[64:67] == ("computer mouse", "tv remote", "computer keyboard")  # mmdet: mouse, remote, keyboard


# ---------------------------------------------------------------- missing weights / environment


@pytest.fixture
def weights_root(tmp_path, monkeypatch):
    monkeypatch.setenv("RTDMD_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "weights"


def test_missing_weights_name_both_files_and_their_sources(weights_root):
    with pytest.raises(MissingWeights) as error:
        REWARDS.get("geneval")()
    message = str(error.value)
    for part in (CKPT_NAME, CHECKPOINT_URL, "open_clip_model.safetensors", "timm/vit_large_patch14_clip_224.openai"):
        assert part in message
    assert "rtdmd-bench weights fetch geneval" in message
    from rtdmd.geneval.colour import ClipColorClassifier

    with pytest.raises(MissingWeights, match="open_clip_model.safetensors"):
        ClipColorClassifier.from_weights()


def _dummy_weights(root: Path) -> None:
    (root / "urls").mkdir(parents=True)
    (root / "urls" / CKPT_NAME).write_bytes(b"not a checkpoint")
    (root / "timm" / "vit_large_patch14_clip_224.openai").mkdir(parents=True)
    (root / "timm" / "vit_large_patch14_clip_224.openai" / "open_clip_model.safetensors").write_bytes(b"")


def test_missing_detector_environment(weights_root, monkeypatch, tmp_path):
    _dummy_weights(weights_root)
    monkeypatch.setenv("RTDMD_GENEVAL_PYTHON", str(tmp_path / "no-env" / "python"))
    with pytest.raises(MissingDetectorEnv, match="RTDMD_GENEVAL_PYTHON"):
        REWARDS.get("geneval")(backend="mmdet")
    monkeypatch.delenv("RTDMD_GENEVAL_PYTHON")
    monkeypatch.setattr(client_module, "TOX_ENV", Path(".tox-absent") / "geneval-mmdet" / "bin" / "python")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingDetectorEnv, match=r"not found at .*\.tox-absent.*build it with `tox -e geneval-mmdet`"):
        default_python()


def test_the_port_takes_genevals_own_checkpoint_and_the_worker_does_not(weights_root, monkeypatch):
    from rtdmd.rewards.geneval_real import GENEVAL_CHECKPOINT

    _dummy_weights(weights_root)
    (weights_root / "urls" / CKPT_NAME).unlink()
    (weights_root / "urls" / GENEVAL_CHECKPOINT.names[0]).write_bytes(b"not a checkpoint either")
    # found and checked against its own published digits (not downloaded, not the 3.x file's)
    with pytest.raises(ValueError, match=f"does not start with 743b7d99.*{GENEVAL_CHECKPOINT.url}"):
        REWARDS.get("geneval")(backend="port")
    monkeypatch.setenv("RTDMD_GENEVAL_PYTHON", sys.executable)
    with pytest.raises(MissingWeights, match=CKPT_NAME):  # mmdet 3.x would load the 2.x names non-strictly
        REWARDS.get("geneval")(backend="mmdet")


def test_checkpoint_with_the_wrong_sha256_is_refused(weights_root, monkeypatch):
    _dummy_weights(weights_root)
    monkeypatch.setenv("RTDMD_GENEVAL_PYTHON", sys.executable)
    with pytest.raises(ValueError, match=f"does not start with c9d0c4f2.*{CHECKPOINT_URL}"):
        REWARDS.get("geneval")()


# ---------------------------------------------------------------- summary


def row(tag: str, prompt: str, correct: bool) -> dict:
    metadata = {"tag": tag, "include": [{"class": prompt, "count": 1}], "prompt": prompt}
    verdict = Verdict(correct=correct, strict_correct=correct, partial=float(correct), reason="")
    return result_row(f"{prompt}.png", metadata, verdict, details={})


# 7 images of 5 prompts; tags first seen in the order single_object, counting, colors
ROWS = [
    row("single_object", "a", True),
    row("single_object", "a", False),
    row("counting", "b", False),
    row("single_object", "c", True),
    row("counting", "b", False),
    row("counting", "d", True),
    row("colors", "e", False),
]
# by hand: images 3/7 = 42.857%; prompts with any correct image: a, c, d of a..e = 3/5; tasks 2/3, 1/3, 0/1;
# overall = (2/3 + 1/3 + 0) / 3 = 1/3
EXPECTED_TEXT = """Summary
=======
Total images: 7
Total prompts: 5
% correct images: 42.86%
% correct prompts: 60.00%

Task breakdown
==============
single_object    = 66.67% (2 / 3)
counting         = 33.33% (1 / 3)
colors           = 0.00% (0 / 1)

Overall score (avg. over tasks): 0.33333
"""


def test_summary_text_is_the_official_one(tmp_path, capsys):
    numbers, text = summary(ROWS)
    assert text == EXPECTED_TEXT
    assert numbers["overall"] == pytest.approx(1 / 3) and numbers["images"] == 7 and numbers["prompts"] == 5
    assert numbers["image_accuracy"] == pytest.approx(3 / 7) and numbers["prompt_accuracy"] == pytest.approx(0.6)
    assert list(numbers["per_task"]) == ["single_object", "counting", "colors"]
    assert numbers["per_task_counts"]["counting"] == {"correct": 1, "images": 3}
    txt, js = write_summary(ROWS, tmp_path / "out")
    assert txt.read_text() == EXPECTED_TEXT
    assert json.loads(js.read_text())["per_task"] == pytest.approx(
        {"single_object": 2 / 3, "counting": 1 / 3, "colors": 0}
    )
    results = write_results(ROWS, tmp_path / "results.jsonl")
    assert read_results(results) == ROWS
    assert summary_main([str(results), "--json", str(tmp_path / "s.json")]) == 0
    assert capsys.readouterr().out == EXPECTED_TEXT
    with pytest.raises(ValueError, match="no GenEval results"):
        summary([])


def test_results_rows_carry_the_official_columns(tmp_path):
    verdict = Verdict(True, False, 0.75, reason="expected x", detected={"cat": [(1.0, 2.0, 3.0, 4.0)]})
    metadata = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "two cats"}
    r = result_row("0/samples/0000.png", metadata, verdict)
    assert list(r)[:7] == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    assert json.loads(r["metadata"]) == metadata and json.loads(r["details"]) == {"cat": [[1.0, 2.0, 3.0, 4.0]]}
    assert (r["strict_correct"], r["partial"]) == (False, 0.75)
    # metadata written as an object (not the official string) is read back as the official string
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({**r, "metadata": metadata}) + "\n")
    assert read_results(path)[0]["metadata"] == json.dumps(metadata)


def test_the_benchmark_scores_geneval_in_this_process_without_a_worker(weights_root, monkeypatch, tmp_path, tiny_clip):
    """``rtdmd-bench --weights-dir W run --suite geneval --metrics geneval``: the port detects in this
    process (the mmdet worker is never started and no environment for it exists), its checkpoint and the
    colour CLIP are the files in ``W``, and every image gets a 0/1 verdict under the port's metric
    version. The networks are stand-ins (the real ones are tested in ``test_geneval_port.py`` and against
    mmdet in ``tox -e geneval-mmdet``); a file with the published sha256 digits cannot be made here."""
    from typer.testing import CliRunner

    from bench.cli import app
    from rtdmd.geneval.colour import CLIP_L14_OPENAI, ClipColorClassifier
    from rtdmd.geneval.m2f import detector as port_detector
    from rtdmd.rewards import geneval_real as real
    from rtdmd.weights import resolve

    _dummy_weights(weights_root)
    monkeypatch.delenv("RTDMD_WEIGHTS")  # found through --weights-dir only
    monkeypatch.setenv("RTDMD_GENEVAL_PYTHON", str(tmp_path / "no-env" / "python"))
    monkeypatch.setattr(real, "_SCORERS", {})
    monkeypatch.setattr(real, "check_checkpoint", lambda path, url: None)
    monkeypatch.setattr(real.DetectorClient, "__init__", lambda *a, **k: pytest.fail("the mmdet worker was started"))
    loaded = []

    def stand_in(path, device="cpu"):
        loaded.append(Path(path))
        torch.manual_seed(0)
        classes = torch.randn(100, 81) * 4
        classes[:10, :4] += 9  # confident person, bicycle, car, motorcycle
        return FixedOutputs(classes, torch.randn(100, 6, 7) * 2)

    monkeypatch.setattr(port_detector, "load_detector", stand_in)
    colour_dirs = []

    def tiny_colours(weights_dir=None, device=None, amp=True):
        colour_dirs.append(resolve("geneval", CLIP_L14_OPENAI, weights_dir))  # where the real one looks
        model, preprocess, tokenizer = tiny_clip
        return ClipColorClassifier(model, tokenizer, preprocess, device="cpu", amp=False)

    monkeypatch.setattr(ClipColorClassifier, "from_weights", staticmethod(tiny_colours))
    out = tmp_path / "runs"
    args = ["--weights-dir", str(weights_root), "run", "--method", "tiny-cps4", "--suite", "geneval"]
    args += ["--limit", "3", "--images-per-prompt", "1", "--metrics", "geneval", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert loaded == [weights_root / "urls" / CKPT_NAME] and colour_dirs == [
        weights_root / "timm" / "vit_large_patch14_clip_224.openai"
    ]
    rows = [json.loads(line) for f in out.rglob("scores*.jsonl") for line in f.read_text().splitlines()]
    geneval_rows = [r for r in rows if r.get("metric") == "geneval"]
    assert len(geneval_rows) == 3, rows
    assert all(r["score"] in (0.0, 1.0) and r["version"] == real.PORT_VERSION for r in geneval_rows)
    assert sum(r["score"] for r in geneval_rows) > 0  # the stand-in's confident classes satisfy some prompts
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    assert "geneval" in json.dumps(summary)

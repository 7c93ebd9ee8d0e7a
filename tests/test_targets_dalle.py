"""DALL-E mini: the tiny model (toy-size BART encoder/decoder, the real VQGAN detokenizer) saved in min-dalle's
checkpoint layout loads through the `dalle-mini` name; seeded per-image sampling; pickle checkpoints only with
consent or after conversion; parity with min-dalle's own modules when it is installed."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from audit.errors import ArtifactError, UnsafeWeightsError
from audit.seeding import image_seeds
from audit.targets import load_target
from audit.targets import dalle
from audit.targets.real import is_dalle_folder

from targets_fixtures import hub_cache, one_torch_thread, tiny_families  # noqa: F401  (fixtures)

CAPTIONS = ["a small red circle at the top left on a grey background", "a large blue square at the center"]


@pytest.fixture(scope="module")
def gen(tiny_families):
    return dalle.DalleGenerator(tiny_families["dalle"])


def test_tiny_model_is_saved_in_min_dalle_layout_with_the_real_detokenizer(tiny_families):
    folder = tiny_families["dalle"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "dalle.json", "decoder_mini.safetensors", "detoker.safetensors", "encoder_mini.safetensors",
        "merges_mini.txt", "vocab_mini.json"]
    assert is_dalle_folder(folder)
    from safetensors import safe_open

    with safe_open(str(folder / "detoker.safetensors"), "pt") as f:
        assert f.get_slice("embedding.weight").get_shape() == [16384, 256]
        assert f.get_slice("decoder.conv_in.weight").get_shape() == [512, 256, 3, 3]
        assert f.get_slice("decoder.up.4.attn.2.q.weight").get_shape() == [512, 512, 1, 1]


def test_dalle_mini_name_resolves_the_cached_checkpoint(hub_cache):
    g = load_target("dalle-mini")
    assert isinstance(g, dalle.DalleGenerator) and g.family == "dalle"
    assert g.identity()["name"] == "dalle-mini" and g.resolution == 32  # a 2 x 2 token grid, 16 px per token
    images = g.generate(CAPTIONS, n_gen=2, seed=0, steps=0)
    assert images.shape == (2, 2, 32, 32, 3) and images.dtype == np.uint8


def test_images_depend_on_caption_and_seed_only(gen):
    images = gen.generate(CAPTIONS, n_gen=2, seed=7, steps=25)
    # Another batch, another step count (meaningless for an autoregressive model): the same images.
    np.testing.assert_array_equal(images[1], gen.generate(CAPTIONS[1:], n_gen=2, seed=7, steps=1)[0])
    seeds = image_seeds(7, CAPTIONS[0], 2)
    tokens = gen.sample_tokens([CAPTIONS[0]] * 2, seeds)
    alone = gen.sample_tokens([CAPTIONS[0]], seeds[1:])
    torch.testing.assert_close(tokens[1:], alone, rtol=0, atol=0)
    assert not torch.equal(tokens[0], tokens[1])
    other = gen.sample_tokens([CAPTIONS[0]] * 2, image_seeds(8, CAPTIONS[0], 2))
    assert not torch.equal(tokens, other)


def test_top_k_and_guidance(tiny_families):
    greedy = dalle.DalleGenerator(tiny_families["dalle"], top_k=1)
    a = greedy.sample_tokens(CAPTIONS[:1], [1])
    b = greedy.sample_tokens(CAPTIONS[:1], [2])
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # top-1: the seed cannot matter
    # Guidance (min-dalle's supercondition factor) mixes in the unconditioned row: other greedy tokens.
    guided = greedy.sample_tokens(CAPTIONS[:1], [1], guidance=16.0)
    assert not torch.equal(a, guided)
    cond, uncond = greedy.text_tokens(CAPTIONS[:1])
    assert cond[0, 0] == 0 and uncond[0].tolist()[:3] == [0, 2, 1]  # <s> </s> <pad>...


def test_tokenizer_spells_words_with_its_merges(gen):
    vocab = gen.tokenizer.token_from_subword
    ids = gen.tokenizer.tokenize("A Red   circle ☺")
    assert ids == [vocab["<s>"], vocab["Ġa"], vocab["Ġred"], vocab["Ġcircle"], vocab["</s>"]]
    # Unknown letters stay single symbols; those missing from the vocabulary become <unk>.
    assert gen.tokenizer.tokenize("zzz") == [vocab["<s>"], vocab["Ġ"]] + [vocab["<unk>"]] * 3 + [vocab["</s>"]]


def _pickle_stem(src, dst, stem):
    from safetensors.torch import load_file

    torch.save(load_file(str(src / f"{stem}.safetensors")), dst / f"{stem}.pt")


def test_pickle_checkpoints_need_consent_or_conversion(tiny_families, gen, tmp_path):
    src, folder = tiny_families["dalle"], tmp_path / "pickled"
    folder.mkdir()
    for name in ("vocab_mini.json", "merges_mini.txt", "dalle.json"):
        shutil.copyfile(src / name, folder / name)
    for stem in ("encoder_mini", "decoder_mini"):
        _pickle_stem(src, folder, stem)
    (folder / "detoker.safetensors").symlink_to(src / "detoker.safetensors")  # 187 MB: not worth a pickle copy
    with pytest.raises(UnsafeWeightsError) as err:
        load_target(str(folder))
    assert f"{folder / 'encoder_mini.pt'}: pickle weights" in str(err.value) and "--allow-pickle" in str(err.value)
    reference = gen.generate(CAPTIONS[:1], 1, 3, 0)
    np.testing.assert_array_equal(load_target(str(folder), allow_pickle=True).generate(CAPTIONS[:1], 1, 3, 0),
                                  reference)
    assert dalle.main([str(folder), str(tmp_path / "converted")]) == 0
    converted = load_target(str(tmp_path / "converted"))
    np.testing.assert_array_equal(converted.generate(CAPTIONS[:1], 1, 3, 0), reference)


def test_weights_of_another_size_are_refused(tiny_families, tmp_path):
    folder = tmp_path / "wrong"
    shutil.copytree(tiny_families["dalle"], folder, symlinks=True)
    config = dalle.DalleConfig.load(folder / "dalle.json")
    dataclasses.replace(config, layer_count=3).save(folder / "dalle.json")
    with pytest.raises(ArtifactError, match="encoder_mini: weights lack .* parameter"):
        dalle.DalleGenerator(folder)
    dataclasses.replace(config, embed_count=48).save(folder / "dalle.json")
    with pytest.raises(ArtifactError, match="weights do not fit this DALL-E config"):
        dalle.DalleGenerator(folder)


def test_port_matches_min_dalle_modules(tmp_path):
    """Same parameter names and the same numbers as min-dalle 0.4.11 (runs only where min-dalle is installed)."""
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    models = pytest.importorskip("min_dalle.models")
    # Importing min_dalle switches autograd off and resets the thread count process-wide: undo that.
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = dataclasses.replace(dalle.MINI, layer_count=2, attention_head_count=4, embed_count=32, glu_embed_count=64,
                              text_vocab_count=100, top_k=1)
    oe = models.DalleBartEncoder(layer_count=2, embed_count=32, attention_head_count=4, text_vocab_count=100,
                                 text_token_count=64, glu_embed_count=64, device="cpu").eval()
    od = models.DalleBartDecoder(image_vocab_count=16384, embed_count=32, attention_head_count=4,
                                 glu_embed_count=64, layer_count=2, device="cpu").eval()
    e, d, _ = dalle.build_modules(cfg)
    e.load_state_dict(oe.state_dict(), strict=True)
    d.load_state_dict(od.state_dict(), strict=True)
    tt = torch.ones((2, 64), dtype=torch.long)
    tt[0, :2] = torch.tensor([0, 2])
    tt[1, :5] = torch.tensor([0, 10, 20, 30, 2])
    with torch.no_grad():
        torch.testing.assert_close(e(tt), oe(tt))
        mask = tt.not_equal(1)[:, None, None, :]
        state = oe(tt)
        att = torch.zeros(2, 4, 256, 32)
        ref = torch.full((1, 257), 2**14 - 1, dtype=torch.long)
        for i in range(16):
            ref[:, i + 1], att = od.sample_tokens(settings=torch.tensor([1.0, 1, 4.0]), attention_mask=mask,
                                                  encoder_state=state, attention_state=att,
                                                  prev_tokens=ref[:, [i]], token_index=torch.arange(256)[[i]])
        kv = d.empty_cache(2)
        ours = torch.full((1, 17), 2**14 - 1, dtype=torch.long)
        rows, rmask = torch.cat([state[1:], state[:1]]), torch.cat([mask[1:], mask[:1]])
        for i in range(16):
            logits, kv = d(ours[:, i].repeat(2), torch.tensor(i), rows, rmask, kv)
            logits = logits[:, :16384]
            ours[:, i + 1] = (logits[1:] * (1 - 4.0) + logits[:1] * 4.0).argmax(1)
    assert torch.equal(ref[:, :17], ours)


def test_dalle_generate_to_features(hub_cache, tiny_families, tmp_path):
    from audit import api
    from audit.features import FeatureStore
    from audit.toy import scenes

    images, captions = scenes.scene_images(2, "members", 2)
    scenes.write_imagefolder(tmp_path / "data", images, captions, [True, False])
    summary = api.featurize("dalle-mini", tmp_path / "data", tmp_path / "store.h5", n_gen=2, steps=1, batch_size=2,
                            quiet=True)  # default embedder/captioner: the real names, cached here as tiny models
    assert summary.ok == 2 and summary.target["name"] == "dalle-mini"
    batch = FeatureStore.open(tmp_path / "store.h5").read()
    np.testing.assert_array_equal(batch["gen_pixels"], load_target("dalle-mini").generate(captions, 2, 0, 0))


def test_dalle_mini_exports_and_runs_features_to_check_on_the_onnx_path(hub_cache, tmp_path):
    """`audit export --target dalle-mini` (encoder, decoder step with a KV cache, detokenizer; the default
    embedder and captioner with it), then features -> train -> check through the export bundle."""
    import json

    from typer.testing import CliRunner

    from audit import api
    from audit.cli import app
    from audit.features import FeatureStore
    from audit.runtime import OnnxDalleGenerator
    from audit.toy import scenes

    bundle = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", "--target", "dalle-mini", "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    info = json.loads((bundle / "target" / "export.json").read_text())
    assert info["family"] == "dalle" and set(info["graphs"]) == {"encoder", "decoder_step", "detokenizer"}
    step = info["graphs"]["decoder_step"]
    assert step["input_names"][-1] == "kv_cache" and step["output_names"] == ["logits", "kv_cache_out"]
    assert step["inputs"]["kv_cache"]["dynamic_axes"] == {"2": "batch"}
    assert all(g["validation"]["passed"] for g in info["graphs"].values())

    again = CliRunner().invoke(app, ["export", "--target", str(bundle), "--out", str(tmp_path / "again")])
    assert again.exit_code == 2 and "compiled already" in again.stderr and "Traceback" not in again.output

    onnx, torch_path = load_target(str(bundle)), load_target("dalle-mini")
    assert isinstance(onnx, OnnxDalleGenerator) and onnx.identity() == torch_path.identity()
    for guidance in (1.0, 4.0):  # the supercondition mix runs on the graphs' logits as on the torch ones
        a, b = torch_path.generate(CAPTIONS, 2, 3, 0, guidance), onnx.generate(CAPTIONS, 2, 3, 0, guidance)
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 2

    images, captions = scenes.scene_images(4, "members", 6)
    data = scenes.write_imagefolder(tmp_path / "data", images, captions, [True, False] * 3)
    summary = api.featurize(str(bundle), data, tmp_path / "store.h5", n_gen=1, steps=1, batch_size=3, quiet=True)
    assert summary.ok == 6 and summary.target == torch_path.identity()
    stored = FeatureStore.open(tmp_path / "store.h5").read()
    want = torch_path.generate(captions, 1, 0, 1)
    assert np.abs(stored["gen_pixels"].astype(int) - want.astype(int)).max() <= 2
    api.train(tmp_path / "store.h5", tmp_path / "heads", attacks="II-S", epochs=2, register=False, folds=0)
    first = sorted(data.glob("*.png"))[0]
    result = CliRunner().invoke(app, ["check", str(first), "--caption", captions[0], "--target",
                                      str(bundle), "--heads", str(tmp_path / "heads"), "--json"])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["target"] == "dalle-mini" and 0.0 <= verdict["probability"] <= 1.0

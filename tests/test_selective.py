"""Selective fine-tuning: attention of chosen layers replaced by fresh mixers, everything else frozen.

The Hugging Face tests take the ``saved`` fixture, which skips them where ``transformers`` (the ``hf``
extra) is not installed; the streamssl-encoder tests run without it."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_encoder
from streamssl.selective import Replacement, parse_layers, replace_attention
from streamssl.selective.hf import HFMixerAttention, lengths_from_mask

FAMILIES = {"wav2vec2": "Wav2Vec2", "hubert": "Hubert", "wavlm": "WavLM"}
"""Each family's class-name prefix in ``transformers``."""
SAMPLES_PER_FRAME = 20


def hf_class(family: str, kind: str):
    """The ``transformers`` class of ``family``: ``kind`` is ``"Config"``, ``"Model"`` or ``"ForCTC"``.
    Only reached from tests that take ``saved``, so transformers is there."""
    import transformers

    return getattr(transformers, FAMILIES[family] + kind)


def tiny_config(family: str, **overrides):
    """Three layers of width 32 and a two-layer conv stack of 20 samples per frame; no dropout, no
    SpecAugment, no LayerDrop, so that runs are deterministic. ``feat_extract_norm="layer"`` normalises
    each frame alone, which makes the whole model padding-exact (the default GroupNorm is not)."""
    values = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  conv_dim=(16, 16), conv_kernel=(10, 4), conv_stride=(5, 4), conv_bias=True,
                  feat_extract_norm="layer", num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                  vocab_size=8, layerdrop=0.0, mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0)
    values.update(overrides)
    return hf_class(family, "Config")(**values)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A ``ForCTC`` checkpoint of each family written with ``save_pretrained`` (its base model loads from it
    too); skips the test where transformers is not installed."""
    pytest.importorskip("transformers")
    paths = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(family)
        hf_class(family, "ForCTC")(tiny_config(family)).save_pretrained(path)
        paths[family] = path
    return paths


def load(saved, family: str, kind: str, **kwargs):
    return hf_class(family, "ForCTC" if kind == "ctc" else "Model").from_pretrained(saved[family], **kwargs)


def waves(seed: int = 1, lengths=(1600, 1100)) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded waveforms ``(B, S)`` and their HF sample mask ``(B, S)``."""
    generator = torch.Generator().manual_seed(seed)
    total = max(lengths)
    x = torch.zeros(len(lengths), total)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, generator=generator)
        mask[i, :n] = 1
    return x, mask


def output_of(model, x, mask):
    out = model(x, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def training_loss(model, x, mask) -> torch.Tensor:
    """CTC loss on fixed labels for a ``ForCTC`` model; for a base model, a fixed regression target."""
    if hasattr(model, "lm_head"):
        labels = torch.tensor([[1, 2, 3, 2], [4, 5, -100, -100]])
        return model(x, attention_mask=mask, labels=labels).loss
    hidden = model(x, attention_mask=mask).last_hidden_state
    target = torch.sin(torch.arange(hidden.shape[-1], dtype=hidden.dtype))
    return F.mse_loss(hidden, target.expand_as(hidden))


# ------------------------------------------------------------------------------------------ HF models
@pytest.mark.parametrize("kind", ["base", "ctc"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_model_converts_and_trains(saved, family, kind):
    torch.manual_seed(0)
    model = load(saved, family, kind)
    x, mask = waves()
    with torch.no_grad():
        shape_before = output_of(model.eval(), x, mask).shape

    assert replace_attention(model, "last:2", mixer="wsm") is model
    layers = model.base_model.encoder.layers
    assert not isinstance(layers[0].attention, HFMixerAttention)
    assert all(isinstance(layer.attention, HFMixerAttention) for layer in layers[1:])
    with torch.no_grad():
        assert output_of(model, x, mask).shape == shape_before

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert ".attention.mixer." in name or name.startswith("lm_head."), name
    assert any(name.startswith("lm_head.") for name in trainable) == (kind == "ctc")

    model.train()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(6):
        optimiser.zero_grad()
        loss = training_loss(model, x, mask)
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
                else:
                    assert p.grad is None, f"frozen {name} got a gradient"
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("family,implementation", [("wav2vec2", "eager"), ("wav2vec2", "sdpa"),
                                                   ("hubert", "eager"), ("hubert", "sdpa"), ("wavlm", "eager")])
@pytest.mark.parametrize("mixer", ["wsm", "summary"])
def test_hf_padding_never_leaks(saved, family, implementation, mixer):
    """A padded batch gives each utterance's valid outputs as if it were alone: the replaced layers read
    the mask the encoder passes (additive, boolean or 2-D, depending on family and implementation)."""
    torch.manual_seed(0)
    model = load(saved, family, "ctc", attn_implementation=implementation)
    replace_attention(model, [1, 2], mixer=mixer).eval()
    lengths = (1600, 1100, 700)
    x, mask = waves(seed=3, lengths=lengths)
    with torch.no_grad():
        batched = output_of(model, x, mask)
        for i, n in enumerate(lengths):
            alone = output_of(model, x[i:i + 1, :n], None)
            frames = alone.shape[1]
            torch.testing.assert_close(batched[i:i + 1, :frames], alone, atol=2e-5, rtol=1e-4)


def test_hf_frozen_prefix_records_no_graph(saved):
    """Nothing before the first replaced layer is kept for backward, even for an input that requires grad."""
    model = replace_attention(load(saved, "wav2vec2", "ctc"), [2]).train()
    layers = model.base_model.encoder.layers
    seen = {}
    layers[1].register_forward_hook(lambda m, args, out: seen.update(prefix=out))
    layers[2].register_forward_pre_hook(lambda m, args, kwargs: seen.update(entering=args[0]), with_kwargs=True)
    x, mask = waves()
    training_loss(model, x, mask).backward()
    assert not seen["prefix"].requires_grad and seen["prefix"].grad_fn is None

    training_loss(model, x.clone().requires_grad_(True), mask).backward()
    assert seen["entering"].grad_fn is None


def test_wavlm_first_layer_keeps_position_bias(saved):
    """WavLM's layer 0 computes the relative position bias the later layers use; replacing it keeps it."""
    model = load(saved, "wavlm", "ctc")
    original = model.base_model.encoder.layers[0].attention
    frames = 11
    expected = original.compute_bias(frames, frames).detach().clone()
    replace_attention(model, [0])
    stand_in = model.base_model.encoder.layers[0].attention
    assert isinstance(stand_in, HFMixerAttention)
    bias = stand_in(torch.randn(2, frames, 32))[2]
    torch.testing.assert_close(bias, expected.unsqueeze(0).expand(2, -1, -1, -1).reshape(8, frames, frames))
    assert not any(p.requires_grad for p in stand_in.position_bias_source.parameters())
    x, mask = waves()
    training_loss(model.train(), x, mask).backward()


@pytest.mark.parametrize("mixer", ["summary", "sa", "maa", "full"])
def test_hf_other_mixers(saved, mixer):
    model = replace_attention(load(saved, "hubert", "ctc"), "last:1", mixer=mixer)
    x, mask = waves()
    loss = training_loss(model.train(), x, mask)
    loss.backward()
    mixer_grads = [p.grad for p in model.base_model.encoder.layers[2].attention.parameters()]
    assert mixer_grads and all(g is not None for g in mixer_grads)


def test_hf_save_and_reload(saved, tmp_path):
    """Config, replacement record and weights rebuild the same model."""
    torch.manual_seed(0)
    model = replace_attention(load(saved, "wavlm", "ctc"), "last:2", windows=[(4, 2), (8, 0)]).eval()
    torch.save({"config": model.config.to_dict(), "replacement": model.selective_replacement.to_dict(),
                "model": model.state_dict()}, tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt")
    rebuilt = hf_class("wavlm", "ForCTC")(hf_class("wavlm", "Config").from_dict(payload["config"]))
    Replacement.from_dict(payload["replacement"]).apply(rebuilt)
    rebuilt.load_state_dict(payload["model"])
    x, mask = waves()
    with torch.no_grad():
        torch.testing.assert_close(output_of(rebuilt.eval(), x, mask), output_of(model, x, mask))


def test_lengths_from_every_mask_kind():
    lengths = torch.tensor([5, 3])
    valid = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    keys = valid[:, None, None, :].expand(2, 1, 5, 5)
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~keys, torch.finfo(torch.float32).min)
    for mask in (valid, valid.long(), keys, additive, additive.masked_fill(~keys, float("-inf"))):
        assert lengths_from_mask(mask, 2, 5, torch.device("cpu")).tolist() == [5, 3]
    assert lengths_from_mask(None, 2, 5, torch.device("cpu")).tolist() == [5, 5]
    with pytest.raises(ValueError, match="right-padded"):
        lengths_from_mask(valid.flip(-1), 2, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match="tensor attention mask"):
        lengths_from_mask(object(), 2, 5, torch.device("cpu"))


def test_bad_requests_fail_clearly(saved):
    model = load(saved, "wav2vec2", "base")
    with pytest.raises(ValueError, match="couples"):
        replace_attention(model, "last:1", mixer="llsa")
    with pytest.raises(ValueError, match="unknown mixer_options"):
        replace_attention(model, "last:1", mixer="wsm", window=3)
    with pytest.raises(ValueError, match="out of range"):
        replace_attention(model, [3])
    with pytest.raises(ValueError, match="supports Hugging Face"):
        replace_attention(torch.nn.Linear(2, 2), [0])
    replace_attention(model, [0])
    with pytest.raises(ValueError, match="already applied"):
        replace_attention(model, [1])


def test_parse_layers():
    assert parse_layers("last:4", 12) == [8, 9, 10, 11]
    assert parse_layers([-1, 0], 12) == [0, 11]
    assert parse_layers("3,1", 12) == [1, 3]
    assert parse_layers(5, 12) == [5]
    for bad in ("last:0", "last:13", "first:2", [], [1, 1], [True]):
        with pytest.raises(ValueError):
            parse_layers(bad, 12)


# ------------------------------------------------------------------------------------------ streamssl Encoder
def test_encoder_converts_trains_and_still_streams():
    encoder = make_encoder("sa", dtype=torch.float32, n_layers=3)
    latency_before = encoder.latency().encoder_lookahead_frames
    x = torch.randn(2, 2400, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([2400, 1500])
    with torch.no_grad():
        shape_before = encoder(x, lengths)[0].shape
    replace_attention(encoder, "last:2", mixer="wsm")
    assert encoder.latency().encoder_lookahead_frames == latency_before

    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(("stack.blocks.1.mixer.", "stack.blocks.2.mixer.")) for name in trainable)

    with torch.no_grad():
        y, y_lengths = encoder(x, lengths)
        assert y.shape == shape_before
        alone = encoder(x[1:, :1500])[0]
        torch.testing.assert_close(y[1:, :alone.shape[1]], alone, atol=1e-5, rtol=1e-4)
        state = encoder.init_state(1)
        parts = []
        for chunk in x[:1].split(700, dim=1):
            out, state = encoder.step(chunk, state)
            parts.append(out)
        parts.append(encoder.flush(state)[0])
        torch.testing.assert_close(torch.cat(parts, dim=1), y[:1], atol=1e-5, rtol=1e-4)

    encoder.train()
    target = torch.cos(torch.arange(32.0))
    optimiser = torch.optim.Adam([p for p in encoder.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        optimiser.zero_grad()
        y, _ = encoder(x, lengths)
        loss = F.mse_loss(y, target.expand_as(y))
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in encoder.parameters() if not p.requires_grad)
    assert losses[-1] < 0.9 * losses[0], losses


def test_encoder_inside_a_model_keeps_its_head_trainable():
    class Recogniser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = make_encoder("sa", dtype=torch.float32)
            self.head = torch.nn.Linear(32, 5)

    model = replace_attention(Recogniser(), [0], mixer="summary", summary="global")
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"encoder", "head"}
    assert model.encoder.stack.blocks[0].mixer.summary == "global"
    assert not model.encoder.stack.blocks[1].mixer.qkv.weight.requires_grad
    assert model.selective_replacement.to_dict() == {"layers": [0], "mixer": "summary",
                                                     "options": {"summary": "global"}}


# ------------------------------------------------------------------------------------------ streamssl finetune
def tiny_corpus(root) -> str:
    """Four one-second utterances (tones and noise) with short transcripts, as a JSONL manifest."""
    import json

    import soundfile

    generator = torch.Generator().manual_seed(0)
    lines = []
    for i, text in enumerate(["AB", "BA", "A B", "BAB"]):
        audio = 0.1 * torch.randn(16000, generator=generator) + 0.3 * torch.sin(torch.arange(16000) * (0.05 + 0.02 * i))
        path = root / f"utt{i}.wav"
        soundfile.write(path, audio.numpy(), 16000)
        lines.append(json.dumps({"id": f"utt{i}", "audio": str(path), "duration": 1.0, "text": text, "speaker": "s"}))
    manifest = root / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return str(manifest)


def test_finetune_cli_from_hf_with_replacement_saves_reloads_and_evaluates(saved, tmp_path, capsys):
    import json

    from streamssl.cli import main
    from streamssl.selective.finetune import HFCTCModel
    from streamssl.train.checkpoint import load_checkpoint

    manifest = tiny_corpus(tmp_path)
    run = tmp_path / "run"
    assert main(["finetune", "--preset", "tiny", "--init", f"hf:{saved['wavlm']}", "--replace", "last:2",
                 "--mixer", "wsm", "--train", manifest, "--steps", "3", "--out", str(run), "--no-progress"]) == 0
    checkpoint = load_checkpoint(run, kind="finetune")
    model = checkpoint.model
    assert isinstance(model, HFCTCModel)
    assert all(isinstance(layer.attention, HFMixerAttention) for layer in model.encoder.encoder.layers[1:])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".attention.mixer." in n or n.startswith("output.") for n in trainable)
    assert checkpoint.step == 3

    # The frozen part is exactly the pretrained model after training; the reloaded model evaluates.
    pretrained = hf_class("wavlm", "Model").from_pretrained(saved["wavlm"]).state_dict()
    reloaded = model.encoder.state_dict()
    for name in ("encoder.layers.0.attention.q_proj.weight", "encoder.layers.2.feed_forward.output_dense.weight",
                 "feature_projection.projection.weight"):
        torch.testing.assert_close(reloaded[name], pretrained[name], rtol=0, atol=0)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", manifest, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_utterances"] == 4 and 0.0 <= result["cer"]
    assert result["latency"]["streamable"] is False


@pytest.mark.parametrize("mode", ["frozen", "replace", "full"])
def test_finetune_modes_on_a_streamssl_encoder(tmp_path, mode):
    from streamssl.train.config import FinetuneConfig
    from streamssl.train.tasks import FinetuneTask

    encoder = dict(EncoderConfig_tiny(), mixer="sa", n_layers=3)
    extra = {"replace": dict(train_mode="replace", replace_layers="last:2", replace_options={"windows": [[4, 1]]}),
             "frozen": dict(train_mode="frozen"), "full": {}}[mode]
    task = FinetuneTask(FinetuneConfig(encoder=encoder, steps=2, **extra), log=lambda *a: None)
    trainable = {name.split(".")[0] for name, p in task.model.named_parameters() if p.requires_grad}
    if mode == "full":
        assert "encoder" in trainable
    elif mode == "frozen":
        assert trainable == {"output"}
    else:
        names = [n for n, p in task.model.named_parameters() if p.requires_grad and n.startswith("encoder.")]
        assert names and all(n.startswith(("encoder.stack.blocks.1.mixer.", "encoder.stack.blocks.2.mixer."))
                             for n in names)
        assert task.model.encoder.stack.blocks[2].mixer.windows == [(4, 1)]


def EncoderConfig_tiny() -> dict:
    from streamssl import EncoderConfig

    return EncoderConfig.tiny().to_dict()


def test_finetune_config_rejects_inconsistent_modes():
    from streamssl.train.config import FinetuneConfig

    with pytest.raises(ValueError, match="needs replace_layers"):
        FinetuneConfig(train_mode="replace")
    with pytest.raises(ValueError, match="train_mode"):
        FinetuneConfig(train_mode="partial")
    with pytest.raises(ValueError, match="replace_layers is set"):
        FinetuneConfig(replace_layers="last:2")


def test_a_hugging_face_checkpoint_says_it_cannot_stream(saved, tmp_path, capsys):
    from streamssl.cli import main
    from streamssl.streaming import Recognizer
    from streamssl.train.checkpoint import load_checkpoint

    manifest = tiny_corpus(tmp_path)
    run = tmp_path / "run"
    assert main(["finetune", "--preset", "tiny", "--init", f"hf:{saved['wav2vec2']}", "--train", manifest,
                 "--steps", "1", "--out", str(run), "--no-progress"]) == 0
    model = load_checkpoint(run, kind="finetune").model
    # the two-layer conv stack: kernels (10, 4), strides (5, 4)
    assert (model.sample_rate, model.hop_samples, model.window_samples) == (16000, 20, 25)
    assert model.latency().frontend_lookahead_ms == pytest.approx(5 / 16)
    with pytest.raises(ValueError, match="^cannot stream: hf-wav2vec2 "):
        Recognizer(model)
    capsys.readouterr()
    for argv in (["evaluate", "--checkpoint", str(run), "--data", manifest, "--streaming"],
                 ["stream", str(tmp_path / "utt0.wav"), "--checkpoint", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"streamssl {argv[0]}: error: cannot stream: hf-wav2vec2 " in err, err

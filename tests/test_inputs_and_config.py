"""Bad input gets a ValueError that names the problem; configs round-trip; the CLI prints latency."""

import json

import pytest
import torch

from conftest import make_encoder
from streamssl import Encoder, EncoderConfig
from streamssl.cli import main


@pytest.fixture(scope="module")
def encoder():
    return make_encoder("sa", dtype=torch.float32)


@pytest.mark.parametrize("x, lengths, message", [
    (torch.randn(4000), None, "shape \\(batch, samples\\)"),
    (torch.randn(2, 4000, 1), None, "shape \\(batch, samples\\)"),
    (torch.randint(-100, 100, (2, 4000), dtype=torch.int16), None, "floating point"),
    (torch.randn(2, 4000, dtype=torch.float64), None, "dtype torch.float64"),
    (torch.full((2, 4000), float("nan")), None, "NaN"),
    (torch.tensor([[0.0] * 3999 + [float("inf")]] * 2), None, "NaN or infinite"),
    (torch.zeros(2, 0), None, "empty"),
    (torch.zeros(0, 4000), None, "empty"),
    (torch.randn(2, 300), None, "shorter than one frame"),
    (torch.randn(2, 4000), torch.tensor([4000, 4001]), "lengths\\[1\\]=4001 exceeds the input's 4000 samples"),
    (torch.randn(2, 4000), torch.tensor([4000]), "1-D tensor of 2"),
    (torch.randn(2, 4000), torch.tensor([4000.0, 10.0]), "integer tensor"),
    (torch.randn(2, 4000), torch.tensor([4000, 0]), "positive"),
])
def test_forward_rejects_bad_input(encoder, x, lengths, message):
    with pytest.raises(ValueError, match=message):
        encoder(x, lengths)


def test_frame_input_checks_width():
    encoder = make_encoder("sa", dtype=torch.float32, frontend="none", input_dim=12)
    with pytest.raises(ValueError, match="\\(batch, frames, 12\\)"):
        encoder(torch.randn(2, 50, 13))


def test_step_rejects_bad_chunks_and_foreign_states(encoder):
    state = encoder.init_state(2)
    with pytest.raises(ValueError, match="batch size 3 but the state holds 2"):
        encoder.step(torch.randn(3, 100), state)
    with pytest.raises(ValueError, match="NaN"):
        encoder.step(torch.full((2, 100), float("nan")), state)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        encoder.step(torch.randn(2, 100, dtype=torch.float64), state)
    other = make_encoder("sa", dtype=torch.float32)
    with pytest.raises(ValueError, match="created by another Encoder"):
        other.step(torch.randn(2, 100), state)
    with pytest.raises(ValueError, match="EncoderState"):
        encoder.step(torch.randn(2, 100), {"not": "a state"})
    _, state = encoder.flush(state)
    with pytest.raises(ValueError, match="already flushed"):
        encoder.step(torch.randn(2, 100), state)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        encoder.init_state(0)


def test_full_attention_refuses_to_stream():
    with pytest.raises(ValueError, match="cannot stream"):
        make_encoder("full").init_state(1)


@pytest.mark.parametrize("overrides, message", [
    (dict(mixer="nope"), "unknown mixer 'nope'"),
    (dict(d_model=30, n_heads=4), "divisible by n_heads"),
    (dict(right_frames=[1, 2, 3]), "3 entries but n_layers is 2"),
    (dict(right_frames=-1), "non-negative"),
    (dict(left_frames=-2), "left_frames"),
    (dict(frontend="mel"), "frontend must be one of"),
    (dict(dropout=1.5), "dropout"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(mixer="sa", mixer_options={"x": 1}), "takes no mixer_options"),
])
def test_config_rejects_impossible_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig.tiny(**overrides)


def test_config_round_trips(tmp_path):
    config = EncoderConfig.tiny(mixer="llsa", left_frames=None, right_frames=[1, 3])
    assert EncoderConfig.from_dict(config.to_dict()) == config
    for name in ("c.yaml", "c.json"):
        config.save(tmp_path / name)
        assert EncoderConfig.load(tmp_path / name) == config
    with pytest.raises(ValueError, match="unknown EncoderConfig keys: \\['colour'\\]"):
        EncoderConfig.from_dict({**config.to_dict(), "colour": "red"})


def test_model_rebuilds_from_saved_config(tmp_path):
    encoder = make_encoder("llsa", dtype=torch.float32)
    encoder.config.save(tmp_path / "config.yaml")
    rebuilt = Encoder(EncoderConfig.load(tmp_path / "config.yaml")).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    x = torch.randn(1, 3000)
    assert torch.equal(encoder(x)[0], rebuilt(x)[0])


def test_cli_latency_json(capsys):
    assert main(["latency", "--mixer", "llsa", "--layers", "12", "--right-frames", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["encoder_lookahead_ms"] == pytest.approx(160.0)
    assert out["encoder_lookahead_frames"] == 8
    assert main(["latency", "--mixer", "maa", "--layers", "12", "--right-frames", "8"]) == 0
    assert "1.92 s" in capsys.readouterr().out


def test_cli_latency_from_config_file_and_bad_values(tmp_path, capsys):
    EncoderConfig.tiny(mixer="sa", right_frames=[1, 2]).save(tmp_path / "enc.yaml")
    assert main(["latency", "--config", str(tmp_path / "enc.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["encoder_lookahead_frames"] == 3
    assert main(["latency", "--mixer", "sa", "--layers", "3", "--right-frames", "1,2"]) == 2
    assert "2 entries but n_layers is 3" in capsys.readouterr().err


def test_config_with_nested_tuples_saves_as_yaml(tmp_path):
    config = EncoderConfig.tiny(mixer="wsm", mixer_options={"windows": ((4, 2), (8, None))})
    config.save(tmp_path / "c.yaml")
    loaded = EncoderConfig.load(tmp_path / "c.yaml")
    assert loaded.to_dict() == config.to_dict()
    assert Encoder(loaded).latency().encoder_lookahead_frames == Encoder(config).latency().encoder_lookahead_frames

"""The streaming recogniser: streamed == offline for any chunking, batched == alone, emission delays,
words, checkpoints, bad input, and the ``streamssl stream`` command."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamssl.asr.ctc import CTCModel
from streamssl.cli import main
from streamssl.config import EncoderConfig
from streamssl.mixers import MIXERS
from streamssl.streaming.pacing import PacedClock
from streamssl.streaming.recognizer import Recognizer
from streamssl.streaming.report import build_report
from streamssl.train.checkpoint import build_model, save_checkpoint
from streamssl.train.config import preset

SAMPLE_RATE = 16000


def _streamable(name: str) -> bool:
    with torch.device("meta"):
        return CTCModel(EncoderConfig.tiny(mixer=name)).encoder.stack.stream_error() is None


STREAMING_MIXERS = sorted(name for name in MIXERS if _streamable(name))


@functools.lru_cache(maxsize=None)
def wave(seconds: float = 0.6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(int(seconds * SAMPLE_RATE), generator=generator, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def tiny_model(mixer: str, head: str = "linear") -> CTCModel:
    """A random tiny float64 CTC model made to talk: a sharpened output layer with a blank bias gives
    varied symbols, repeats and blanks, and the symbol it says most becomes the word boundary, so
    transcripts hold several words. Everything the greedy merge across chunks must get right."""
    torch.manual_seed(0)
    return make_talk(CTCModel(EncoderConfig.tiny(mixer=mixer), head=head, lstm_hidden=16).double().eval())


def make_talk(model: CTCModel) -> CTCModel:
    """Sharpen the output layer, bias it to blank, and swap the most said symbol with the space."""
    space = model.vocab.index[" "]
    with torch.no_grad():
        model.output.weight *= 6
        model.output.bias[model.vocab.blank] += 3
        best = model(wave().to(model.output.weight.dtype)[None])[0][0].argmax(-1)
        talk = best[best != model.vocab.blank]
        if talk.numel():
            common = int(talk.mode().values)
            for param in (model.output.weight, model.output.bias):
                param[[common, space]] = param[[space, common]]
    return model


def uniform_lookahead_mixer() -> str:
    """A mixer whose every frame waits the same, non-zero look-ahead (segment-based ones vary within a
    segment), for exact delay checks."""
    for name in STREAMING_MIXERS:
        latency = tiny_model(name).latency()
        worst, mean = latency.encoder_lookahead_frames, latency.encoder_mean_lookahead_frames
        if worst and mean == worst:
            return name
    raise AssertionError("no registered mixer has a uniform look-ahead")


def offline_tokens(model: CTCModel, audio: torch.Tensor) -> list[tuple[int, int]]:
    """(token id, frame) of the best path of the offline forward: the reference for streaming."""
    with torch.no_grad():
        log_probs, lengths = model(audio[None])
    best = log_probs[0, : int(lengths[0])].argmax(-1).tolist()
    tokens, previous = [], model.vocab.blank
    for frame, token in enumerate(best):
        if token != previous and token != model.vocab.blank:
            tokens.append((token, frame))
        previous = token
    return tokens


def feed(stream, audio: torch.Tensor, sizes: list[int]) -> None:
    """Feed ``audio`` in pieces of ``sizes`` (cycled) until it is all in."""
    if audio.numel() == 0:
        return
    position, i = 0, 0
    while position < audio.numel():
        n = sizes[i % len(sizes)]
        stream.accept(audio[position:position + n])
        position, i = position + n, i + 1


class ManualClock:
    """A clock the test sets by hand: compute takes no time on it, so delays are exact."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


# ------------------------------------------------------------------------- streamed == offline
@settings(max_examples=20, deadline=None, derandomize=True)
@given(mixer=st.sampled_from(STREAMING_MIXERS),
       head=st.sampled_from(["linear", "lstm"]),
       pieces=st.lists(st.integers(0, 3000), min_size=1, max_size=8),
       rest=st.integers(160, 4000),
       chunk_ms=st.sampled_from([None, 5, 20, 37.5, 160]))
def test_streamed_transcript_equals_offline_for_any_chunking(mixer, head, pieces, rest, chunk_ms):
    """Pieces of any size (empty and single samples included), then the rest of the audio in pieces of
    ``rest``; the recogniser may also regroup them into chunks of ``chunk_ms``."""
    model = tiny_model(mixer, head)
    audio = wave()
    reference = offline_tokens(model, audio)
    stream = Recognizer(model, chunk_ms=chunk_ms).stream()
    position = 0
    for n in pieces:
        stream.accept(audio[position:position + n])
        position += n
    feed(stream, audio[position:], [rest])
    transcript = stream.finish()
    assert [(t.token_id, t.frame) for t in transcript.tokens] == reference
    assert transcript.text == model.vocab.decode([token for token, _ in reference])
    assert stream.frames_out == (audio.numel() - 400) // 320 + 1


def test_transcripts_are_not_trivial():
    # The property above would hold vacuously for a model that only ever says blank.
    for mixer in STREAMING_MIXERS:
        tokens = offline_tokens(tiny_model(mixer), wave())
        text = tiny_model(mixer).vocab.decode([token for token, _ in tokens])
        assert len(tokens) >= 5 and len(text.split()) >= 2, f"{mixer}: {text!r}"


def test_words_and_token_times():
    model = tiny_model(STREAMING_MIXERS[0])
    stream = Recognizer(model).stream()
    feed(stream, wave(), [1000])
    transcript = stream.finish()
    assert [w.text for w in transcript.words] == transcript.text.split()
    for token in transcript.tokens:
        assert token.start_s == pytest.approx(token.frame * 0.02)
        assert token.end_s == pytest.approx(token.frame * 0.02 + 0.025)
    for word in transcript.words:
        assert word.start_s < word.end_s


# ------------------------------------------------------------------------- batching
@pytest.mark.parametrize("mixer", STREAMING_MIXERS)
@pytest.mark.parametrize("head", ["linear", "lstm"])
def test_batched_streams_with_staggered_starts_equal_single_streams(mixer, head):
    model = tiny_model(mixer, head)
    audios = [wave(0.6, seed) for seed in range(4)]
    recognizer = Recognizer(model, chunk_ms=20)
    calls = []
    step = model.step_window

    def counting_step(chunk, state, counts=None):
        calls.append(chunk.shape[0])
        return step(chunk, state, counts)

    model.step_window = counting_step
    try:
        # Streams 0 and 1 start together; 2 starts three rounds later; 3 starts with 2 but is fed
        # bigger pieces; 1 ends early. Pieces of 320 samples keep everyone on the 20 ms chunk grid.
        streams = [recognizer.stream(), recognizer.stream()]
        results = {}
        position = [0, 0, 0, 0]
        for round_ in range(40):
            if round_ == 3:
                streams += [recognizer.stream(), recognizer.stream()]
            feeds = {}
            for i, stream in enumerate(streams):
                if stream.finished:
                    continue
                n = 960 if i == 3 else 320
                if i == 1 and position[1] >= 4800:
                    results[1] = stream.finish()
                    continue
                piece = audios[i][position[i]:position[i] + n]
                if piece.numel():
                    feeds[stream] = piece
                    position[i] += n
            if feeds:
                recognizer.accept(feeds)
        for i, stream in enumerate(streams):
            if not stream.finished:
                results[i] = stream.finish()
    finally:
        del model.step_window
    assert max(calls) == 4, "every stream with a chunk waiting shares one call, whatever its position"
    for i, audio in enumerate(audios):
        fed = audio[:4800] if i == 1 else audio
        alone = Recognizer(model).stream()
        alone.accept(fed)
        expected = alone.finish()
        assert [(t.token_id, t.frame) for t in results[i].tokens] == [(t.token_id, t.frame) for t in expected.tokens]
        assert [(t.token_id, t.frame) for t in results[i].tokens] == offline_tokens(model, fed)


def test_states_at_different_positions_stack_and_select_back():
    model = tiny_model(STREAMING_MIXERS[0], "lstm")
    recognizer = Recognizer(model)
    streams = [recognizer.stream() for _ in range(3)]
    for i, stream in enumerate(streams):
        stream.accept(wave(0.6, i)[:1000 + 700 * i])
    states = [s.state for s in streams]
    stacked = model.stack_states(states)
    assert stacked.encoder.batch_size == 3 and stacked.lstm[0].shape[0] == 3
    assert stacked.encoder.samples_in.tolist() == [1000, 1700, 2400]
    for i, original in enumerate(states):
        back = stacked.select([i])
        for a, b in zip(torch.utils._pytree.tree_leaves(back), torch.utils._pytree.tree_leaves(original)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------- emission delay
def hop_by_hop_delays_ms(model, chunk_ms: float | None = None) -> np.ndarray:
    """Feed 1 s one 20 ms hop per call with the clock at each call's audio time (compute free);
    return the emission delay of every frame emitted before the final flush."""
    clock = ManualClock()
    stream = Recognizer(model, chunk_ms=chunk_ms, clock=clock).stream()
    audio = wave(1.0)
    for start in range(0, audio.numel(), 320):
        clock.now_s = (start + 320) / SAMPLE_RATE
        stream.accept(audio[start:start + 320])
    streamed = stream.frames_out
    stream.finish()
    return 1000 * np.array(stream.frame_delays_s[:streamed])


@pytest.mark.parametrize("mixer", STREAMING_MIXERS)
def test_emission_delay_equals_declared_lookahead_with_zero_compute(mixer):
    # One 20 ms hop per call, the clock at the audio time of each call, compute free: a frame must
    # wait exactly for the encoder's look-ahead (the frontend's 5 ms fall inside the hop grid).
    model = tiny_model(mixer)
    delays_ms = hop_by_hop_delays_ms(model)
    latency = model.latency()
    assert len(delays_ms) > 20
    assert delays_ms.max() == pytest.approx(latency.encoder_lookahead_ms)
    assert delays_ms.min() >= 0
    assert delays_ms.mean() == pytest.approx(latency.encoder_mean_lookahead_ms, abs=20.0)


def test_chunk_wait_counts_in_the_emission_delay():
    model = tiny_model(uniform_lookahead_mixer())
    lookahead_ms = model.latency().encoder_lookahead_ms
    delays_ms = hop_by_hop_delays_ms(model, chunk_ms=60)
    # Audio enters the model every third hop, so a frame waits 0, 20 or 40 ms more than its look-ahead.
    assert set(np.round(delays_ms - lookahead_ms).astype(int)) <= {0, 20, 40}
    assert delays_ms.max() == pytest.approx(lookahead_ms + 40)


def test_simulated_pace_skips_waiting_but_keeps_delays():
    model = tiny_model(uniform_lookahead_mixer())
    # CPU time: the delays this process would see with a core to itself, so other jobs on the machine
    # (a full test run at low priority behind a training) cannot push the median past the bound.
    clock = PacedClock(simulate=True, cpu_time=True)
    recognizer = Recognizer(model, chunk_ms=20, clock=clock.now)
    stream = recognizer.stream()
    audio = wave(1.0)
    clock.start()
    for start in range(0, audio.numel(), 320):
        clock.wait_until((start + 320) / SAMPLE_RATE)
        stream.accept(audio[start:start + 320])
    streamed = stream.frames_out
    stream.finish()
    delays_ms = 1000 * np.array(stream.frame_delays_s[:streamed])
    lookahead_ms = model.latency().encoder_lookahead_ms
    assert clock.now() - clock._start_s >= 1.0
    # With one hop a call and a uniform look-ahead, a frame waits its look-ahead, then the CPU time of the
    # call that emits it: what the clock counted past the waits it skipped, no more.
    excess_ms = delays_ms - lookahead_ms
    assert excess_ms.min() >= 0
    assert excess_ms.max() <= 1000 * max(stream.cpu_s) + 1.0  # 1 ms: the checks of accept, outside the call
    report = build_report(recognizer, [stream], "simulated")
    assert report.chunks == len(stream.compute_s) == 50
    assert report.algorithmic_ms == pytest.approx(model.latency().total_lookahead_ms + 20)
    assert 0 < report.compute_p50_ms <= report.compute_p95_ms
    assert report.rtf == pytest.approx((sum(stream.compute_s) + stream.flush_s) / 1.0)


# ------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_a_reason():
    model = tiny_model(STREAMING_MIXERS[0])
    stream = Recognizer(model).stream()
    with pytest.raises(ValueError, match="1-D"):
        stream.accept(torch.zeros(2, 100, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating point"):
        stream.accept(np.zeros(100, dtype=np.int16))
    with pytest.raises(ValueError, match="NaN"):
        stream.accept(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"peak magnitude of 1200.*dividing by 32768"):
        stream.accept(np.array([0.0, -1200.0, 3.0], dtype=np.float32))
    stream.accept(np.array([1.5, -1.5], dtype=np.float32))  # headroom for overshoot is accepted
    assert stream.accept(np.zeros(0, dtype=np.float32)).tokens == []
    other = stream.engine.stream()
    with pytest.raises(ValueError, match="1-D"):
        stream.engine.accept({other: np.zeros(500), stream: np.zeros((1, 500))})
    assert other.samples_in == 0, "a bad feed must leave the other streams untouched"
    stream.accept(np.zeros(800, dtype=np.float32))
    stream.finish()
    with pytest.raises(ValueError, match="finished"):
        stream.accept(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="finished"):
        stream.finish()
    with pytest.raises(ValueError, match="frontend='none'"):
        Recognizer(CTCModel(EncoderConfig.tiny(frontend="none", input_dim=8)))
    with pytest.raises(ValueError, match="sample_rate 8000 Hz: this model takes 16000 Hz audio"):
        stream.engine.stream(sample_rate=8000)
    assert stream.engine.stream(sample_rate=16000).samples_in == 0
    with pytest.raises(ValueError, match="cannot stream"):
        Recognizer(CTCModel(EncoderConfig.tiny(mixer="full")))


# ------------------------------------------------------------------------- checkpoint and CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = preset("finetune", "tiny")
    torch.manual_seed(0)
    model = make_talk(build_model("finetune", config, config.encoder).eval())
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint(path, {"kind": "finetune", "encoder_config": config.encoder.to_dict(),
                           "task_config": config.to_dict(), "vocab": model.vocab.symbols,
                           "model": model.state_dict(), "progress": {"step": 0, "epoch": 0, "batch_in_epoch": 0}})
    return path


def test_from_checkpoint_streams_like_the_offline_model(checkpoint):
    recognizer = Recognizer.from_checkpoint(checkpoint, chunk_ms=40)
    audio = wave(0.6).float()
    stream = recognizer.stream()
    feed(stream, audio, [640])
    assert [(t.token_id, t.frame) for t in stream.finish().tokens] == offline_tokens(recognizer.model, audio)


def test_cli_streams_files_reports_latency_and_survives_bad_files(checkpoint, tmp_path, capsys):
    audio = wave(0.6).numpy().astype(np.float32)
    good = tmp_path / "good.wav"
    soundfile.write(good, audio, SAMPLE_RATE)
    stereo_8k = tmp_path / "stereo_8k.wav"
    soundfile.write(stereo_8k, np.stack([audio[::2], audio[::2]], axis=1), 8000)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")

    code = main(["stream", "--checkpoint", str(checkpoint), str(good), str(broken), str(stereo_8k),
                 "--chunk-ms", "40", "--json"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "broken.wav" in err and "stereo_8k.wav: 2 channels" in err and "8000 Hz, resampled" in err
    result = json.loads(out)
    assert [f["file"] for f in result["failed"]] == [str(broken)]
    assert [f["file"] for f in result["files"]] == [str(good), str(stereo_8k)]
    recognizer = Recognizer.from_checkpoint(checkpoint)
    offline = offline_tokens(recognizer.model, torch.from_numpy(audio))
    assert result["files"][0]["transcript"] == recognizer.model.vocab.decode([t for t, _ in offline])
    assert result["files"][0]["transcript"].split() == [w["text"] for w in result["files"][0]["words"]]
    latency = result["latency"]
    declared = recognizer.latency().total_lookahead_ms + 40
    assert latency["algorithmic_ms"] == pytest.approx(declared)
    assert latency["audio_s"] == pytest.approx(1.2, abs=0.01)
    assert latency["compute_p50_ms"] > 0 and latency["rtf"] > 0
    # A word finished before the flush waited at least the encoder's look-ahead for its right context.
    lookahead_ms = recognizer.latency().encoder_lookahead_ms
    words = result["files"][0]["words"]
    before_flush = [w for w in words if w["end_s"] + (lookahead_ms + 40) / 1000 <= 0.6]
    assert before_flush and all(w["delay_ms"] >= lookahead_ms for w in before_flush)

    code = main(["stream", "--checkpoint", str(checkpoint), str(good)])
    out, _ = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    transcript = result["files"][0]["transcript"]
    assert f"{good}: {transcript}" in lines
    # piped: each update prints only the words it completed, never the transcript so far
    progress = [line.split(": ", 1)[1] for line in lines if line.startswith(f"{good} @ ")]
    assert progress and " ".join(progress).split() == transcript.split()[:len(" ".join(progress).split())]
    assert any(line.startswith("  emission delay per word") for line in lines)


def test_partial_display_rewrites_one_line_on_a_terminal_and_prints_only_news_to_a_pipe():
    import io

    from streamssl.commands.stream import PartialDisplay
    from streamssl.streaming.recognizer import Token, Update, Word

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    token = Token("L", 12, 3, 0.06, 0.085, 0.05)
    hello = Word("HELLO", 0.0, 0.5, 0.1)
    updates = [Update([token], [], "HEL"), Update([], [], "HEL"), Update([token], [hello], "HELLO "),
               Update([token], [], "HELLO W")]
    out = Terminal()
    display = PartialDisplay("a.wav", out)
    for update in updates:
        display.show(update)
    display.done("HELLO WORLD")
    assert out.getvalue() == "\r\x1b[Ka.wav: HEL\r\x1b[Ka.wav: HELLO \r\x1b[Ka.wav: HELLO W\r\x1b[Ka.wav: HELLO WORLD\n"
    piped = io.StringIO()
    display = PartialDisplay("a.wav", piped)
    for update in updates:
        display.show(update)
    display.done("HELLO WORLD")
    assert piped.getvalue() == "a.wav @ 0.50 s: HELLO\na.wav: HELLO WORLD\n"


def test_cli_names_bad_parameters_and_paths(checkpoint, tmp_path, capsys):
    good = tmp_path / "good.wav"
    soundfile.write(good, wave(0.3).numpy().astype(np.float32), SAMPLE_RATE)
    assert main(["stream", "--checkpoint", str(checkpoint), str(good), "--threads", "0"]) == 2
    assert capsys.readouterr().err == "streamssl stream: error: --threads must be at least 1, got 0\n"
    assert main(["stream", "--checkpoint", str(checkpoint), str(good), "--chunk-ms", "-5"]) == 2
    assert "--chunk-ms must be positive, got -5" in capsys.readouterr().err
    code = main(["stream", "--checkpoint", str(checkpoint), str(tmp_path / "nope.wav"), str(tmp_path), str(good),
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{tmp_path / 'nope.wav'}: no such file" in err and f"{tmp_path}: is a folder" in err
    assert "System error" not in err
    assert [f["file"] for f in json.loads(out)["files"]] == [str(good)]


def test_a_calls_compute_is_split_among_its_streams_so_rtf_holds_at_any_batch_size(monkeypatch):
    """Eight streams fed together share each model call; each records its share, so the report's real-time
    factor is the calls' time over the audio, as for one stream, not eight times it."""
    import streamssl.streaming.engine as engine

    class Ticking:
        """Every reading one second after the last: each call (two readings) takes exactly 1 s."""

        def __init__(self):
            self.now = 0.0

        def read(self) -> float:
            self.now += 1.0
            return self.now

    wall, cpu = Ticking(), Ticking()
    monkeypatch.setattr(engine, "time", type("FakeTime", (), {"perf_counter": staticmethod(wall.read),
                                                              "process_time": staticmethod(cpu.read)}))
    model = tiny_model(STREAMING_MIXERS[0])
    recognizer = Recognizer(model, chunk_ms=40)
    streams = [recognizer.stream() for _ in range(8)]
    for start in range(0, 9600, 640):
        recognizer.accept({s: wave(0.6, i)[start:start + 640] for i, s in enumerate(streams)})
    finished = recognizer.finish(streams)
    assert all(t.text == s.text for s, t in finished.items())
    calls = recognizer.calls
    assert calls == 15
    assert sum(len(s.compute_s) for s in streams) == 8 * calls
    assert sum(sum(s.compute_s) for s in streams) == pytest.approx(calls)
    assert sum(s.flush_s for s in streams) == pytest.approx(1.0)
    report = build_report(recognizer, streams, "as fast as possible")
    assert report.audio_s == pytest.approx(8 * 0.6)
    assert report.rtf == pytest.approx((calls + 1) / (8 * 0.6))
    assert report.rtf_cpu == pytest.approx((calls + 1) / (8 * 0.6))

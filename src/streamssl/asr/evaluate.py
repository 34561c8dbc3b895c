"""CTC transcription (greedy, or a lexicon beam search) and its scores: WER, CER (jiwer), declared latency,
real-time factor."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import jiwer
import torch
from torch import Tensor
from tqdm import tqdm

from streamssl.asr.ctc import CharVocab, GreedyDecoder, RecognitionModel
from streamssl.asr.lexicon import BeamSearchConfig, LexiconDecoder


@dataclass
class EvalResult:
    """Scores of one pass over a data set.

    ``rtf`` is compute time (model and decoder) over audio time (audio loading excluded); ``latency`` is the
    model's declared latency (:meth:`~streamssl.Latency.to_dict`); ``decoder`` is ``"greedy"`` or ``"lexicon"`` (whose options ``beam`` holds);
    ``hypotheses`` holds ``(id, reference, hypothesis)``.
    """

    wer: float
    cer: float
    n_utterances: int
    audio_seconds: float
    compute_seconds: float
    rtf: float
    streaming: bool
    chunk_ms: float | None
    latency: dict
    decoder: str = "greedy"
    beam: dict | None = None
    hypotheses: list[tuple[str, str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# Offline decoding holds a whole utterance's activations at once (memory grows with its length, with
# full attention quadratically); longer utterances are refused rather than cut (see evaluate_model).
MAX_OFFLINE_SECONDS = 120.0


def new_decoder(vocab: CharVocab, batch_size: int, beam: BeamSearchConfig | None = None
                ) -> GreedyDecoder | LexiconDecoder:
    """Greedy CTC decoding, or the lexicon beam search with ``beam``'s options."""
    return GreedyDecoder(vocab, batch_size) if beam is None else LexiconDecoder(vocab, batch_size, beam)


@torch.no_grad()
def transcribe_offline(model: RecognitionModel, dataset, device: torch.device, batch_seconds: float = 60.0,
                       progress: bool = False, beam: BeamSearchConfig | None = None) -> tuple[list[str], float]:
    """Whole-utterance decoding in duration-sorted batches of ``dataset`` (an
    :class:`~streamssl.data.AudioDataset`), loading one batch's audio at a time. Returns hypotheses
    (dataset order) and the compute time in seconds. ``beam``: as in :func:`new_decoder`."""
    from streamssl.data import collate

    durations = dataset.durations
    order = sorted(range(len(dataset)), key=lambda i: durations[i])
    batches, current, longest = [], [], 0.0
    for i in order:
        if current and max(longest, durations[i]) * (len(current) + 1) > batch_seconds:
            batches.append(current)
            current, longest = [], 0.0
        current.append(i)
        longest = max(longest, durations[i])
    if current:
        batches.append(current)
    hyps: list[str] = [""] * len(dataset)
    compute = 0.0
    for batch in tqdm(batches, desc="decode (offline)", disable=not progress, leave=False):
        collated = collate([dataset[i] for i in batch])
        start = time.perf_counter()
        log_probs, frame_lengths = model(collated["audio"].to(device, model.dtype),
                                         collated["lengths"].to(device))
        decoder = new_decoder(model.vocab, len(batch), beam)
        decoder.push(log_probs, frame_lengths)
        decoder.finish()
        texts = decoder.texts()
        compute += time.perf_counter() - start
        for i, text in zip(batch, texts):
            hyps[i] = text
    return hyps, compute


# Streams decoded at once by streaming evaluation: enough to amortise a step's fixed cost, few enough
# that a tick stays short on a CPU.
STREAMING_BATCH_SIZE = 16


@torch.no_grad()
def transcribe_streaming(model: RecognitionModel, dataset, device: torch.device, chunk_ms: float,
                         progress: bool = False, beam: BeamSearchConfig | None = None,
                         batch_size: int = STREAMING_BATCH_SIZE) -> tuple[list[str], float]:
    """Chunk-by-chunk decoding of every utterance of ``dataset``, ``batch_size`` streams at a time.

    Each tick feeds every running stream its next chunk (the last one shorter, right-aligned) in one
    ``step_window`` call; a stream whose audio is all in is flushed and leaves, and the next utterance
    (loaded then) joins, so the batch stays full. Streams share calls whatever their positions, so
    every utterance's frames are those it gets alone (up to float rounding), and each goes through its
    own decoder of :func:`new_decoder` as its frames become final. Returns hypotheses (dataset order)
    and the compute time in seconds (model and decoders; audio loading excluded).
    """
    if not chunk_ms > 0:
        raise ValueError(f"chunk_ms must be positive, got {chunk_ms:g}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    chunk = max(1, round(chunk_ms * model.sample_rate / 1000))
    hyps: list[str] = [""] * len(dataset)
    compute = 0.0
    waiting = iter(range(len(dataset)))
    # Running streams, in batch order: (utterance index, samples (S,), samples fed, decoder).
    running: list[tuple[int, Tensor, int, GreedyDecoder | LexiconDecoder]] = []
    state = None
    bar = tqdm(total=len(dataset), desc=f"decode (streaming, {chunk_ms:g} ms chunks, {batch_size} streams)",
               disable=not progress, leave=False)
    while True:
        joining = []
        while len(running) + len(joining) < batch_size and (index := next(waiting, None)) is not None:
            joining.append((index, dataset[index]["audio"].to(device, model.dtype), 0,
                            new_decoder(model.vocab, 1, beam)))
        start = time.perf_counter()
        if joining:
            fresh = [model.init_state(1) for _ in joining]
            state = model.stack_states(([state] if running else []) + fresh)
            running += joining
        if not running:
            break
        pieces = [wave[fed:fed + chunk] for _, wave, fed, _ in running]
        counts = torch.tensor([p.numel() for p in pieces], device=device)
        width = int(counts.max())
        batch = torch.stack([torch.nn.functional.pad(p, (width - p.numel(), 0)) for p in pieces])
        log_probs, emitted, state = model.step_window(batch, state, counts)
        for row, (_, _, _, decoder) in enumerate(running):
            decoder.push(log_probs[row:row + 1], emitted[row:row + 1])
        running = [(index, wave, fed + p.numel(), decoder)
                   for (index, wave, fed, decoder), p in zip(running, pieces)]
        staying = []
        for row, (index, wave, fed, decoder) in enumerate(running):
            if fed < wave.numel():
                staying.append(row)
                continue
            log_probs, _ = model.flush(state.select([row]))
            decoder.push(log_probs)
            decoder.finish()
            hyps[index] = decoder.texts()[0]
            bar.update(1)
        if len(staying) < len(running):
            running = [running[row] for row in staying]
            state = state.select(staying) if staying else None
        compute += time.perf_counter() - start
    bar.close()
    return hyps, compute


def score(references: list[str], hypotheses: list[str]) -> tuple[float, float]:
    """Corpus WER and CER (fractions) with jiwer."""
    return float(jiwer.wer(references, hypotheses)), float(jiwer.cer(references, hypotheses))


def evaluate_model(model: RecognitionModel, utterances: list, streaming: bool = False, chunk_ms: float = 40.0,
                   device: torch.device | None = None, progress: bool = False,
                   max_offline_s: float = MAX_OFFLINE_SECONDS, beam: BeamSearchConfig | None = None,
                   batch_size: int = STREAMING_BATCH_SIZE) -> EvalResult:
    """Decode ``utterances`` (``streamssl.data.Utterance``) and score them against their text: greedy CTC, or
    with ``beam`` the lexicon beam search (:mod:`streamssl.asr.lexicon`).

    ``streaming`` decodes chunk by chunk, ``batch_size`` streams at a time (:func:`transcribe_streaming`);
    a model that cannot stream is a ``ValueError`` saying why.
    Offline, an utterance longer than ``max_offline_s`` seconds is a ``ValueError`` naming it, raised
    before any audio is decoded. It is refused rather than split: cutting at fixed points would split
    words and take away the whole-utterance context that offline decoding stands for, so the score
    would measure the cuts; streaming evaluation decodes any length with the model's memory bounded (the
    lexicon decoder keeps its beam history per utterance, see :mod:`streamssl.asr.lexicon`).
    """
    if streaming and model.stream_error() is not None:
        raise ValueError(model.stream_error())
    if streaming and not chunk_ms > 0:
        raise ValueError(f"chunk_ms must be positive, got {chunk_ms:g}")
    if not streaming:
        longest = max(utterances, key=lambda utt: utt.duration, default=None)
        if longest is not None and longest.duration > max_offline_s:
            raise ValueError(f"utterance {longest.id} ({longest.audio}) is {longest.duration:.0f} s long, over "
                             f"the {max_offline_s:g} s offline limit: offline decoding holds a whole utterance "
                             "in memory; evaluate it with --streaming, segment it, or raise --max-offline-s")
    from streamssl.data import AudioDataset

    device = device or model.device
    model.eval()
    dataset = AudioDataset(utterances, sample_rate=model.sample_rate)
    if streaming:
        hyps, compute = transcribe_streaming(model, dataset, device, chunk_ms, progress, beam=beam,
                                             batch_size=batch_size)
    else:
        hyps, compute = transcribe_offline(model, dataset, device, progress=progress, beam=beam)
    refs = [utt.text for utt in utterances]
    wer, cer = score(refs, hyps)
    audio_seconds = sum(utt.duration for utt in utterances)
    return EvalResult(wer=wer, cer=cer, n_utterances=len(utterances), audio_seconds=audio_seconds,
                      compute_seconds=compute, rtf=compute / audio_seconds, streaming=streaming,
                      chunk_ms=chunk_ms if streaming else None, latency=model.latency().to_dict(),
                      decoder="greedy" if beam is None else "lexicon", beam=None if beam is None else beam.to_dict(),
                      hypotheses=[(utt.id, ref, hyp) for utt, ref, hyp in zip(utterances, refs, hyps)])

"""Character CTC recogniser: an :class:`~streamssl.Encoder`, a linear or LSTM head, greedy decoding.

Offline::

    log_probs, frame_lengths = model(wave, lengths)      # (B, T, V) log-probabilities, (B,)
    texts = greedy_decode(log_probs, frame_lengths, model.vocab)

Streaming (what :class:`streamssl.streaming.Recognizer` drives)::

    state = model.init_state(batch_size)
    decoder = GreedyDecoder(model.vocab, batch_size)
    for chunk in chunks:                                 # (B, n) samples, any n
        log_probs, state = model.step(chunk, state)      # (B, m, V), m >= 0 frames became final
        new_tokens = decoder.push(log_probs)             # per stream, the (frame, token id) emitted now
    log_probs, state = model.flush(state)
    decoder.push(log_probs); decoder.texts()             # == greedy_decode of the offline output

A unidirectional head adds no look-ahead, so the model's latency is its encoder's.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from streamssl.asr.vocab import BLANK, CharVocab, GreedyDecoder, SentencePieceVocab
from streamssl.config import EncoderConfig
from streamssl.encoder import Encoder, EncoderState
from streamssl.frontends import FeatureAugment
from streamssl.latency import Latency
from streamssl.masking import span_mask
from streamssl.mixers.window import streaming_state

def greedy_decode(log_probs: Tensor, lengths: Tensor, vocab: CharVocab) -> list[str]:
    """Best path per utterance: arg-max per frame, merge repeats, drop blanks. ``log_probs`` ``(B, T, V)``,
    ``lengths`` ``(B,)`` valid frames."""
    decoder = GreedyDecoder(vocab, log_probs.shape[0])
    decoder.push(log_probs, lengths)
    return decoder.texts()


class RecognitionModel(Protocol):
    """What evaluation, :class:`streamssl.streaming.Recognizer` and the command line use of a CTC model.

    ``forward(wave, lengths)``: ``(B, S)`` samples at ``sample_rate`` -> ``(B, T, V)`` log-probabilities
    over ``vocab`` and ``(B,)`` valid frames. Output frame ``t`` reads samples
    ``[t * hop_samples, t * hop_samples + window_samples)`` (both ``None`` without a waveform frontend).
    ``stream_error()`` says why the model cannot stream (``None`` if it can); only then do
    ``init_state``/``step``/``step_window``/``flush``/``flush_window`` work, with the meaning of
    :class:`CTCModel`'s.
    """

    vocab: CharVocab

    @property
    def sample_rate(self) -> int: ...

    @property
    def hop_samples(self) -> int | None: ...

    @property
    def window_samples(self) -> int | None: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def __call__(self, wave: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def latency(self) -> Latency: ...

    def stream_error(self) -> str | None: ...

    def init_state(self, batch_size: int) -> Any: ...

    def stack_states(self, states: Sequence[Any]) -> Any: ...

    def step(self, chunk: Tensor, state: Any) -> tuple[Tensor, Any]: ...

    def step_window(self, chunk: Tensor, state: Any, counts: Tensor | None = None,
                    flush: Tensor | None = None) -> tuple[Tensor, Tensor, Any]: ...

    def flush(self, state: Any) -> tuple[Tensor, Any]: ...

    def flush_window(self, state: Any) -> tuple[Tensor, Tensor, Any]: ...


@streaming_state
class CTCState:
    """Streaming state: the encoder's, and the LSTM head's ``(h, c)``, each ``(B, layers, hidden)``
    (batch first, like every streaming tensor; ``None`` for a linear head)."""

    encoder: EncoderState
    lstm: tuple[Tensor, Tensor] | None

    def select(self, indices: Sequence[int] | Tensor) -> "CTCState":
        """The streams ``indices`` (in that order) as a new batch."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.encoder.samples_in.device)
        return tree_map(lambda leaf: leaf.index_select(0, index), self)


class CTCModel(nn.Module):
    """Encoder + CTC head over ``vocab`` (:class:`CharVocab`, the default, or :class:`SentencePieceVocab`).

    Args:
        encoder_config: the encoder to build (weights may then be loaded from a pretraining run).
        head: ``"linear"`` or ``"lstm"``.
        bidirectional: a BLSTM head; refused on an encoder that can stream (it would undo the streaming).
        mask_prob, mask_length: time masking of projected features while training (SpecAugment-like).
        freeze_frontend: compute frontend features without gradient.
    """

    def __init__(self, encoder_config: EncoderConfig, head: str = "linear", lstm_hidden: int = 320,
                 lstm_layers: int = 1, bidirectional: bool = False, mask_prob: float = 0.0,
                 mask_length: int = 10, freeze_frontend: bool = False,
                 vocab: CharVocab | SentencePieceVocab | None = None):
        super().__init__()
        self.vocab = vocab or CharVocab()
        self.encoder = Encoder(encoder_config)
        if bidirectional and self.stream_error() is None:
            raise ValueError(f"a bidirectional LSTM head reads the whole utterance; mixer "
                             f"{encoder_config.mixer!r} streams, so use a unidirectional head "
                             "(bidirectional is for offline encoders such as 'full')")
        self.head_type = head
        self.bidirectional = bidirectional
        self.mask_prob, self.mask_length = mask_prob, mask_length
        self.freeze_frontend = freeze_frontend
        if freeze_frontend:
            self.encoder.frontend.requires_grad_(False)
        d_model = encoder_config.d_model
        if head == "lstm":
            self.lstm: nn.LSTM | None = nn.LSTM(d_model, lstm_hidden, lstm_layers, batch_first=True,
                                                bidirectional=bidirectional)
            out_dim = lstm_hidden * (2 if bidirectional else 1)
        elif head == "linear":
            self.lstm = None
            out_dim = d_model
        else:
            raise ValueError(f"head must be 'linear' or 'lstm', got {head!r}")
        self.mask_embedding = nn.Parameter(torch.zeros(d_model))
        self.output = nn.Linear(out_dim, len(self.vocab))

    # ------------------------------------------------------------------ offline
    def encode(self, x: Tensor, lengths: Tensor | None = None, mask_seeds: list[int] | None = None,
               train_encoder: bool = True, augment: FeatureAugment | None = None) -> tuple[Tensor, Tensor]:
        """Encoder output ``(B, T, d_model)`` and frame counts; time-masked when ``mask_seeds`` is given,
        and the frontend's spectral features transformed by ``augment`` (e.g. SpecAugment) when given."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_encoder):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_frontend):
                feats, frame_lengths = self.encoder.features(x, lengths, augment)
            h = self.encoder.project(feats)
            if mask_seeds is not None and self.mask_prob > 0:
                mask = span_mask(frame_lengths, mask_seeds, self.mask_prob, self.mask_length, h.shape[1])
                h = torch.where(mask[..., None], self.mask_embedding.to(h.dtype), h)
            return self.encoder.encode_frames(h, frame_lengths), frame_lengths

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask_seeds: list[int] | None = None,
                train_encoder: bool = True, augment: FeatureAugment | None = None) -> tuple[Tensor, Tensor]:
        """Waveform ``(B, S)`` -> log-probabilities ``(B, T, V)`` (float32) and valid frames ``(B,)``.

        ``mask_seeds``: one seed per utterance to time-mask (training only); ``train_encoder=False``
        runs the encoder without gradient (frozen warm-up); ``augment``: see :meth:`encode`.
        """
        y, frame_lengths = self.encode(x, lengths, mask_seeds, train_encoder, augment)
        if self.lstm is not None:
            total = y.shape[1]
            packed = nn.utils.rnn.pack_padded_sequence(y, frame_lengths.cpu(), batch_first=True,
                                                       enforce_sorted=False)
            y, _ = self.lstm(packed)
            y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=total)
        return self.output(y).float().log_softmax(-1), frame_lengths

    # ---------------------------------------------------------------- streaming
    def init_state(self, batch_size: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> CTCState:
        """A fresh state for ``batch_size`` streams (``ValueError`` if the encoder cannot stream)."""
        enc = self.encoder.init_state(batch_size, device, dtype)
        lstm = None
        if self.lstm is not None:
            shape = (batch_size, self.lstm.num_layers, self.lstm.hidden_size)
            zeros = torch.zeros(shape, device=enc.positional.device, dtype=enc.positional.dtype)
            lstm = (zeros, zeros.clone())
        return CTCState(enc, lstm)

    def stack_states(self, states: Sequence[CTCState]) -> CTCState:
        """One batch of the streams of ``states`` (each at any position), in order."""
        encoder = self.encoder.stack_states([s.encoder for s in states])
        lstm = None
        if states[0].lstm is not None:
            lstm = (torch.cat([s.lstm[0] for s in states]), torch.cat([s.lstm[1] for s in states]))
        return CTCState(encoder, lstm)

    def _head_step(self, y: Tensor, emitted: Tensor,
                   lstm: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple | None]:
        """``y`` ``(B, m, D)`` whose first ``emitted[b]`` frames are real -> log-probabilities ``(B, m, V)``.

        The LSTM runs one frame at a time so that a stream's state advances over its real frames only.
        """
        if self.lstm is not None:
            h, c = lstm[0].transpose(0, 1), lstm[1].transpose(0, 1)
            outputs = []
            for j in range(y.shape[1]):
                out, (h_j, c_j) = self.lstm(y[:, j:j + 1], (h.contiguous(), c.contiguous()))
                real = (j < emitted).view(1, -1, 1)
                h, c = torch.where(real, h_j, h), torch.where(real, c_j, c)
                outputs.append(out)
            y = torch.cat(outputs, dim=1) if outputs else y.new_zeros(y.shape[0], 0, self.lstm.hidden_size)
            lstm = (h.transpose(0, 1), c.transpose(0, 1))
        return self.output(y).float().log_softmax(-1), lstm

    def step(self, chunk: Tensor, state: CTCState) -> tuple[Tensor, CTCState]:
        """Feed ``(B, n)`` samples; returns log-probabilities ``(B, m, V)`` of frames that became final
        (row ``b``'s first ``frames_out[b]`` minus its previous value are real when streams differ)."""
        log_probs, emitted, state = self.step_window(chunk, state)
        return log_probs[:, :int(emitted.max())], state

    def step_window(self, chunk: Tensor, state: CTCState, counts: Tensor | None = None,
                    flush: Tensor | None = None) -> tuple[Tensor, Tensor, CTCState]:
        """:meth:`Encoder.step_window` through the head (what the exporter traces): log-probabilities
        ``(B, m, V)`` with each stream's real frames first, how many ``(B,)``, and the new state.
        ``flush`` ``(B,)`` bool marks the streams whose call is padding past their end."""
        y, emitted, enc = self.encoder.step_window(chunk, state.encoder, counts, flush)
        log_probs, lstm = self._head_step(y, emitted, state.lstm)
        return log_probs, emitted, CTCState(enc, lstm)

    def advance_features(self, feats: Tensor, frame_counts: Tensor, frontend_state: Any, input_counts: Tensor,
                         state: CTCState, flush: Tensor | None = None) -> tuple[Tensor, Tensor, CTCState]:
        """:meth:`Encoder.advance_features` through the head: the step from the frontend's frames on,
        for an export whose graph starts there (fbank: after the log-mel frames, see
        ``FbankFrontend.encode_window``). Arguments as there, outputs as :meth:`step_window`'s."""
        y, emitted, enc = self.encoder.advance_features(feats, frame_counts, frontend_state, input_counts,
                                                        state.encoder, flush)
        log_probs, lstm = self._head_step(y, emitted, state.lstm)
        return log_probs, emitted, CTCState(enc, lstm)

    def flush(self, state: CTCState) -> tuple[Tensor, CTCState]:
        """End every stream; returns the last frames' log-probabilities ``(B, m, V)``."""
        log_probs, emitted, state = self.flush_window(state)
        return log_probs[:, :int(emitted.max())], state

    def flush_window(self, state: CTCState) -> tuple[Tensor, Tensor, CTCState]:
        """:meth:`flush` with :meth:`step_window`'s outputs (:meth:`Encoder.flush_window` through the head)."""
        y, emitted, enc = self.encoder.flush_window(state.encoder)
        log_probs, lstm = self._head_step(y, emitted, state.lstm)
        return log_probs, emitted, CTCState(enc, lstm)

    # ------------------------------------------------------------ RecognitionModel
    @property
    def sample_rate(self) -> int:
        return self.encoder.config.sample_rate

    @property
    def hop_samples(self) -> int | None:
        frontend = self.encoder.frontend
        return None if frontend.input_dim is not None else frontend.geometry.hop

    @property
    def window_samples(self) -> int | None:
        # A frame's audio: its own hop and the look-ahead past it (the frontend's earlier context aside).
        frontend = self.encoder.frontend
        return None if frontend.input_dim is not None else frontend.geometry.hop + frontend.geometry.lookahead

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def stream_error(self) -> str | None:
        """Why the encoder cannot stream, or ``None`` if it can."""
        return self.encoder.stack.stream_error()

    def latency(self) -> Latency:
        """The encoder's declared latency (a unidirectional head adds none; a BLSTM only exists on an
        encoder whose latency is already the whole utterance)."""
        return self.encoder.latency()

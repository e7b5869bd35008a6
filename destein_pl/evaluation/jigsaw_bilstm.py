"""`jigsaw-bilstm`: the Jigsaw toxic-comment BiLSTM of the PyPI package `toxic-comment-classifier` (MIT licence,
Md Irfan Ali), ported to torch, so that evaluation has a second offline judge that shares nothing with the steered
model (neither its weights nor its tokenizer nor the steering pairs' corpus).

The package ships a Keras model's weights (`toxic_classifier/model/model.weights.h5`) and a pickled legacy Keras
`Tokenizer` (`toxic_classifier/model/tokenizer.pickle`). Its own code needs TensorFlow; this port does not: the
weights are read with h5py, and the tokenizer through a restricted unpickler that builds only a plain record of the
tokenizer's state (nothing is executed), whose `texts_to_sequences` is reproduced here. The network is the
package's: ids of the last 100 words, padded in front with zeros -> Embedding(20000, 50) -> Bidirectional(LSTM(50))
over all 100 steps (the padding included: the Keras model has no mask) -> global max pooling over time ->
Dense(50, relu) -> Dense(6, sigmoid), one probability per Jigsaw label. It runs in float32 on the CPU.

Install with `pip install h5py` and `pip install --no-deps toxic-comment-classifier` (the package's own requirements
pull TensorFlow, which is not needed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pickle
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destein_pl.evaluation.scorer_base import ToxicityScorer

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
MEAN = "mean"  # the package's own `predict`: the mean of the six labels
MAXLEN = 100
VOCAB_SIZE = 20000
EMBEDDING_DIM = 50
UNITS = 50
HIDDEN = 50
PACKAGE = "toxic_classifier"  # the import name of the distribution below
DISTRIBUTION = "toxic-comment-classifier"
INSTALL = ("pip install h5py && pip install --no-deps toxic-comment-classifier (without its dependencies: they pull "
           "TensorFlow, which this torch port does not need)")

KERAS_TOKENIZER = ("keras.src.legacy.preprocessing.text", "Tokenizer")


class KerasTokenizerState:
    """What a pickled legacy Keras `Tokenizer` becomes here: a plain record of its attributes (`state`), no code."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"a Keras Tokenizer's pickled state must be a dict, got "
                                         f"{type(state).__name__}")
        self.state = dict(state)


# Everything a pickled legacy Keras Tokenizer names: the class itself (mapped to the record above), its word
# counts (OrderedDict), its document counts (defaultdict(int)).
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    KERAS_TOKENIZER: KerasTokenizerState,
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): defaultdict,
    ("builtins", "int"): int,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `ALLOWED_GLOBALS` (a Keras Tokenizer becomes a `KerasTokenizerState`) and
    refuses any other global, so that reading the tokenizer can run no code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: a Keras tokenizer pickle may only name {allowed}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a pickle with persistent ids: a Keras tokenizer pickle has none")


def read_keras_tokenizer(path: str | Path) -> LegacyKerasTokenizer:
    """The legacy Keras `Tokenizer` pickled at `path`, read with `RestrictedUnpickler` (nothing is executed)."""
    with open(path, "rb") as file:
        loaded = RestrictedUnpickler(file).load()
    if not isinstance(loaded, KerasTokenizerState):
        raise TypeError(f"{path}: expected a pickled {'.'.join(KERAS_TOKENIZER)}, got {type(loaded).__name__}")
    # A Tokenizer pickled without its state (no BUILD) has no `state`: then every attribute is reported missing.
    return LegacyKerasTokenizer.from_state(getattr(loaded, "state", {}), str(path))


@dataclass(frozen=True)
class LegacyKerasTokenizer:
    """Legacy Keras `Tokenizer.texts_to_sequences` (`keras.src.legacy.preprocessing.text`), reproduced from a
    tokenizer's stored settings: lower-case, replace each `filters` character with `split`, split on `split`,
    drop empty words (or, with `char_level`, take the lower-cased characters as they are); look each word up in
    `word_index`; keep indexes below `num_words` (when set); an index at or above it, or an unknown word, becomes
    the `oov_token`'s index when there is one, and is dropped otherwise."""

    word_index: dict[str, int]
    filters: str
    lower: bool
    split: str
    char_level: bool
    num_words: int | None
    oov_token: str | None

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str = "tokenizer") -> LegacyKerasTokenizer:
        """The tokenizer a pickled Keras Tokenizer's attributes describe, checked."""
        expected = {"word_index": dict, "filters": str, "lower": bool, "split": str, "char_level": bool,
                    "num_words": (int, type(None)), "oov_token": (str, type(None))}
        for key, kind in expected.items():
            if key not in state:
                raise ValueError(f"{source}: the Keras tokenizer has no `{key}`")
            if not isinstance(state[key], kind) or (kind is not bool and isinstance(state[key], bool)):
                raise ValueError(f"{source}: the Keras tokenizer's `{key}` has type {type(state[key]).__name__}")
        if state.get("analyzer") is not None:
            raise ValueError(f"{source}: the Keras tokenizer has a custom `analyzer`, which cannot be reproduced")
        if not state["split"] and not state["char_level"]:
            raise ValueError(f"{source}: the Keras tokenizer's `split` is empty")
        word_index = state["word_index"]
        if not all(isinstance(w, str) and type(i) is int and i >= 1 for w, i in word_index.items()):
            raise ValueError(f"{source}: the Keras tokenizer's `word_index` must map words to indexes >= 1")
        oov = state["oov_token"]
        if oov is not None and oov not in word_index:
            raise ValueError(f"{source}: the Keras tokenizer's `oov_token` {oov!r} has no index")
        return cls(word_index=word_index, filters=state["filters"], lower=state["lower"], split=state["split"],
                   char_level=state["char_level"], num_words=state["num_words"], oov_token=oov)

    @property
    def max_index(self) -> int:
        """The largest index `texts_to_sequences` can give."""
        kept = self.num_words - 1 if self.num_words else max(self.word_index.values(), default=0)
        return max(kept, self.word_index[self.oov_token] if self.oov_token is not None else 0)

    def words(self, text: str) -> list[str]:
        """What Keras looks up for `text`: `text_to_word_sequence`, or its characters with `char_level`."""
        if self.char_level:
            return list(text.lower() if self.lower else text)
        if self.lower:
            text = text.lower()
        text = text.translate(str.maketrans({c: self.split for c in self.filters}))
        return [w for w in text.split(self.split) if w]

    def texts_to_sequences(self, texts: Iterable[str]) -> list[list[int]]:
        """One list of word indexes per text, as Keras' `Tokenizer.texts_to_sequences`."""
        oov_index = self.word_index[self.oov_token] if self.oov_token is not None else None
        sequences = []
        for text in texts:
            sequence = []
            for word in self.words(text):
                index = self.word_index.get(word)
                if index is not None and not (self.num_words and index >= self.num_words):
                    sequence.append(index)
                elif oov_index is not None:
                    sequence.append(oov_index)
            sequences.append(sequence)
        return sequences


def pad_pre(sequences: Sequence[Sequence[int]], maxlen: int = MAXLEN) -> torch.Tensor:
    """Keras' `pad_sequences(sequences, maxlen)` with its defaults: the last `maxlen` indexes of each sequence
    (truncating 'pre'), after leading zeros (padding 'pre'); int64."""
    out = torch.zeros(len(sequences), maxlen, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        kept = list(sequence)[-maxlen:]
        if kept:
            out[row, maxlen - len(kept):] = torch.tensor(kept, dtype=torch.int64)
    return out


class JigsawBiLSTM(nn.Module):
    """The package's network: Embedding -> Bidirectional(LSTM, all steps) -> max over time -> Dense(relu) ->
    Dense(sigmoid). Dropout is left out: the model only runs for inference, where Keras' dropout does nothing."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, embedding_dim: int = EMBEDDING_DIM, units: int = UNITS,
                 hidden: int = HIDDEN, labels: int = len(LABELS)) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, units, batch_first=True, bidirectional=True)
        self.dense = nn.Linear(2 * units, hidden)
        self.out = nn.Linear(hidden, labels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Probabilities (batch, labels) of ids (batch, steps), every step run, padding included (no mask)."""
        states, _ = self.lstm(self.embedding(ids))  # (batch, steps, 2 * units): forward then backward, per step
        return torch.sigmoid(self.out(torch.relu(self.dense(states.amax(dim=1)))))


def keras_lstm_weights(kernel: torch.Tensor, recurrent: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """One Keras LSTM cell's `kernel` (in, 4u), `recurrent_kernel` (u, 4u) and `bias` (4u) as torch `nn.LSTM`
    weights. Both order the gates input, forget, cell candidate, output; Keras has one bias, torch two (the second
    is set to zero)."""
    return {"weight_ih": kernel.T.contiguous(), "weight_hh": recurrent.T.contiguous(), "bias_ih": bias.clone(),
            "bias_hh": torch.zeros_like(bias)}


def read_keras_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The package's `model.weights.h5` (Keras 3 layout: `layers/<layer>/vars/<i>`) as a `JigsawBiLSTM` state
    dict, every tensor's shape checked."""
    try:
        import h5py
    except ImportError as err:
        raise ImportError(f"jigsaw-bilstm reads the weights with h5py, which is not installed ({err}); install it "
                          f"with: {INSTALL}") from None
    shapes = {
        "embedding/vars/0": (VOCAB_SIZE, EMBEDDING_DIM),
        **{f"bidirectional/{side}_layer/cell/vars/{i}": shape for side in ("forward", "backward")
           for i, shape in enumerate([(EMBEDDING_DIM, 4 * UNITS), (UNITS, 4 * UNITS), (4 * UNITS,)])},
        "dense/vars/0": (2 * UNITS, HIDDEN), "dense/vars/1": (HIDDEN,),
        "dense_1/vars/0": (HIDDEN, len(LABELS)), "dense_1/vars/1": (len(LABELS),),
    }
    arrays: dict[str, torch.Tensor] = {}
    with h5py.File(path, "r") as file:
        for key, shape in shapes.items():
            if f"layers/{key}" not in file:
                raise ValueError(f"{path}: no weights at layers/{key}; not the toxic-comment-classifier model")
            dataset = file[f"layers/{key}"]
            found = getattr(dataset, "shape", None)  # None: a group, not an array
            if found is None or tuple(found) != shape:
                raise ValueError(f"{path}: layers/{key} has shape {found}, expected {shape}")
            arrays[key] = torch.from_numpy(dataset[()]).float()
    state = {"embedding.weight": arrays["embedding/vars/0"],
             "dense.weight": arrays["dense/vars/0"].T.contiguous(), "dense.bias": arrays["dense/vars/1"],
             "out.weight": arrays["dense_1/vars/0"].T.contiguous(), "out.bias": arrays["dense_1/vars/1"]}
    for side, suffix in (("forward", ""), ("backward", "_reverse")):
        cell = [arrays[f"bidirectional/{side}_layer/cell/vars/{i}"] for i in range(3)]
        for name, tensor in keras_lstm_weights(*cell).items():
            state[f"lstm.{name}_l0{suffix}"] = tensor
    return state


def package_files() -> tuple[Path, Path]:
    """The installed package's weights and tokenizer files. The package is located without being imported (its
    `__init__` imports TensorFlow)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"jigsaw-bilstm needs the package {DISTRIBUTION}, which is not installed; install it with: "
                          f"{INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    weights, tokenizer = folder / "model.weights.h5", folder / "tokenizer.pickle"
    for path in (weights, tokenizer):
        if not path.is_file():
            raise FileNotFoundError(f"jigsaw-bilstm: {path} is missing from the installed {DISTRIBUTION}; reinstall "
                                    f"it with: {INSTALL}")
    return weights, tokenizer


def package_version() -> str | None:
    """The installed `toxic-comment-classifier`'s version, or None."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


class JigsawBiLSTMScorer(ToxicityScorer):
    """The Jigsaw toxic-comment BiLSTM of the package `toxic-comment-classifier` (MIT), ported to torch.

    Offline and deterministic, in float32 on the CPU: a judge independent of the steered model. A text is
    lower-cased and stripped of punctuation; of its words, those among the 20,000 most frequent of the Jigsaw
    training data are kept (the others are dropped), and the last 100 of them are read. Install: `pip install
    h5py` and `pip install --no-deps toxic-comment-classifier` (its own requirements pull TensorFlow, which is not
    needed).

    Args:
        label: the Jigsaw label whose probability is the toxicity: `toxic` (default), `severe_toxic`, `obscene`,
            `threat`, `insult`, `identity_hate`, or `mean`: the mean of the six (the package's own `predict`).
        batch_size: texts per forward pass, at least 1.
    """

    name = "jigsaw-bilstm"

    def __init__(self, label: str = "toxic", batch_size: int = 64) -> None:
        accepted = (*LABELS, MEAN)
        if label not in accepted:
            raise ValueError(f"jigsaw-bilstm: unknown `label` {label!r}; accepted: {', '.join(accepted)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"jigsaw-bilstm: `batch_size` must be an integer of at least 1, got {batch_size!r}")
        self.label, self.batch_size = label, batch_size
        self.tokenizer: LegacyKerasTokenizer | None = None
        self.model: JigsawBiLSTM | None = None

    def _setup(self) -> None:
        weights, tokenizer_file = package_files()
        state = read_keras_weights(weights)
        tokenizer = read_keras_tokenizer(tokenizer_file)
        if tokenizer.max_index >= VOCAB_SIZE:
            raise ValueError(f"{tokenizer_file}: the tokenizer gives indexes up to {tokenizer.max_index}, beyond the "
                             f"embedding's {VOCAB_SIZE} rows")
        model = JigsawBiLSTM()
        model.load_state_dict(state)
        self.model, self.tokenizer = model.float().eval(), tokenizer

    def _score(self, texts: list[str]) -> list[float | None]:
        scores: list[float | None] = []
        for start in range(0, len(texts), self.batch_size):
            probs = self.probabilities(texts[start : start + self.batch_size])
            if self.label == MEAN:
                scores.extend(probs.double().mean(dim=1).tolist())
            else:
                scores.extend(probs[:, LABELS.index(self.label)].tolist())
        return scores

    @torch.inference_mode()
    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """The six labels' probabilities (len(texts), 6), float32, in `LABELS` order, in one forward pass."""
        self.setup()
        if not texts:
            return torch.zeros(0, len(LABELS))
        return self.model(pad_pre(self.tokenizer.texts_to_sequences(texts)))

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "package": f"{DISTRIBUTION} {package_version()}"}

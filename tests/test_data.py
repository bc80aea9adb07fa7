"""Datasets: the named sets parse with their documented counts; k-shot sampling; user files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from app.grafting.data import DataError, Example, load_dataset, read_user_data, resolve_task_data, sample_k_shot

# (train, official dev or None, test) row counts from ../shared/data/README.md (after dropping empty texts).
EXPECTED_COUNTS = {
    "sst2": (6920, 872, 1821),
    "sst2-phrases": (67349, 872, 1821),
    "sst5": (8544, 1101, 2210),
    "mr": (10662 - 2000, None, 2000),
    "cr": (3775 - 4 - 2000, None, 2000),
    "mpqa": (10606 - 3 - 2000, None, 2000),
    "subj": (10000 - 2000, None, 2000),
    "trec": (5452, None, 500),
    "agnews": (10001, None, 7600),
    "rte": (2127 + 363, None, 277),
    "amazon-books": (1700, 300, 2000),
    "amazon-dvd": (1700, 300, 2000),
    "amazon-electronics": (1700, 300, 2000),
    "amazon-kitchen": (1700, 300, 2000),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_named_dataset_counts(name: str, data_dir: Path) -> None:
    dataset = load_dataset(name, data_dir)
    train, dev, test = EXPECTED_COUNTS[name]
    assert len(dataset.train) == train
    assert (None if dataset.dev is None else len(dataset.dev)) == dev
    assert len(dataset.test) == test
    every = dataset.train + dataset.test + (dataset.dev or [])
    assert all(example.text.strip() for example in every)
    assert {example.label for example in every} == set(range(len(dataset.labels)))


def test_label_maps_and_pairs(data_dir: Path) -> None:
    counts = Counter(e.label for e in load_dataset("trec", data_dir).train)
    assert len(counts) == 6
    rte = load_dataset("rte", data_dir)
    assert all(e.text_pair for e in rte.train + rte.test)
    assert Counter(e.label for e in rte.test) == {0: 146, 1: 131}
    agnews = load_dataset("agnews", data_dir)
    assert Counter(e.label for e in agnews.test) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    # Latin-1 files hold byte 0x85 inside lines: splitting on '\n' only keeps the documented row count.
    mr = load_dataset("mr", data_dir)
    assert Counter(e.label for e in mr.train + mr.test) == {0: 5331, 1: 5331}


def test_seeded_test_split_is_fixed(data_dir: Path) -> None:
    first, second = load_dataset("cr", data_dir), load_dataset("cr", data_dir)
    assert first.test == second.test
    assert not {e.text for e in first.test} & {e.text for e in first.train} - {e.text for e in first.test}


def _pool(n_per_class: int, classes: int = 3) -> list[Example]:
    return [Example(f"text {c}-{i}", c) for c in range(classes) for i in range(n_per_class)]


def test_k_shot_is_deterministic_balanced_and_disjoint() -> None:
    pool = _pool(50)
    train, dev = sample_k_shot(pool, 8, seed=13)
    assert (train, dev) == sample_k_shot(pool, 8, seed=13)
    assert train != sample_k_shot(pool, 8, seed=14)[0]
    assert Counter(e.label for e in train) == {0: 8, 1: 8, 2: 8}
    assert Counter(e.label for e in dev) == {0: 8, 1: 8, 2: 8}
    assert not set(train) & set(dev)


def test_k_shot_refuses_small_classes() -> None:
    with pytest.raises(DataError, match="class 1 has 3 examples"):
        sample_k_shot(_pool(10)[:13], 4, seed=0)


def test_user_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"text": "good", "label": "pos"},
                {"text": "bad", "label": "neg", "text_pair": "really"},
            ]
        )
    )
    examples, labels = read_user_data(jsonl)
    assert labels == ("neg", "pos")
    assert examples == [Example("good", 1), Example("bad", 0, "really")]
    csv_file = tmp_path / "dev.csv"
    csv_file.write_text("text,label\nfine,pos\nawful,0\n")
    dev, _ = read_user_data(csv_file, labels)
    assert [e.label for e in dev] == [1, 0]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("", ".jsonl", "no examples"),
        ("{not json", ".jsonl", "line 1: not valid JSON"),
        ('{"text": "", "label": "a"}', ".jsonl", "'text' must be a non-empty string"),
        ('{"text": "x"}', ".jsonl", "'label' is missing"),
        ("words,label\nx,1\n", ".csv", "must name 'text' and 'label'"),
        ("x", ".parquet", "unsupported data format"),
    ],
)
def test_user_data_errors_name_the_problem(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_user_data(path)


def test_user_labels_must_match(tmp_path: Path) -> None:
    path = tmp_path / "dev.jsonl"
    path.write_text('{"text": "x", "label": "maybe"}\n')
    with pytest.raises(DataError, match="label 'maybe' is not one of"):
        read_user_data(path, ("neg", "pos"))


def test_resolve_user_data_splits_dev(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(20)))
    data = resolve_task_data(train_file=path, seed=1)
    assert len(data.train) == 18 and len(data.dev) == 2
    assert not set(data.train) & set(data.dev)

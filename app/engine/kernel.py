"""A fused CPU kernel for the mixed path's Linear-weight deltas, compiled on first use.

For entry ``e`` of a batch plan (row ``n``, output feature ``r``, input column ``c``, delta ``d``) a Linear hook
adds ``d · x[n, t, c]`` to ``y[n, t, r]`` at every position ``t``. Written with torch operators that is two index
grids, a gather, a multiply and an ``index_add_`` over positions × entries, and ``index_add_`` alone costs ~7 ns an
element on the development machine: the mixed path's largest cost (README, Benchmarks). The loop below does the
same additions in one pass, entry by entry, walking the positions with a constant stride that the hardware
prefetchers follow, and without holding the GIL: MiniLM's Linear hooks 22–33 → 12–14 ms of CPU per 32-row batch
over 32 tasks (benchmarks/mixed_profile.py, README).

It is compiled with torch's ``cpp_extension`` (a C++ compiler and ninja; ~1 minute, once per machine and torch
version, cached under ``$TORCH_EXTENSIONS_DIR/skillgraft`` or ``~/.cache/torch_extensions/skillgraft``) in a
background thread started by the first engine; until it is ready, or where it cannot be built, the hooks use the
torch operators (always, with ``EngineConfig.mixed_kernel`` false: ``SKILLGRAFT_MIXED_KERNEL=false``). Only float32
CPU tensors with int32 index bases take it (``usable``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Protocol

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>

namespace {

void check(const torch::Tensor& y, const torch::Tensor& y_base, const torch::Tensor& delta, int64_t length,
           int64_t width_out) {
  TORCH_CHECK(y.is_contiguous() && y_base.is_contiguous() && delta.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(y.scalar_type() == torch::kFloat && delta.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(y_base.scalar_type() == torch::kInt && y_base.numel() == delta.numel(), "one int32 base per entry");
  TORCH_CHECK(length >= 0 && width_out >= 0, "negative length or width");
  const int32_t* yb = y_base.data_ptr<int32_t>();
  for (int64_t e = 0; e < delta.numel(); ++e)
    TORCH_CHECK(yb[e] >= 0 && yb[e] + (length - 1) * width_out < y.numel(), "output index out of range");
}

}  // namespace

// Linear weight entries: y[y_base[e] + t * width_out] += delta[e] * x[x_base[e] + t * width_in] for t < length.
void linear_delta(torch::Tensor y, torch::Tensor x, torch::Tensor y_base, torch::Tensor x_base, torch::Tensor delta,
                  int64_t length, int64_t width_out, int64_t width_in) {
  check(y, y_base, delta, length, width_out);
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat, "x: contiguous float32");
  TORCH_CHECK(width_in >= 0, "negative width");
  TORCH_CHECK(x_base.is_contiguous() && x_base.scalar_type() == torch::kInt && x_base.numel() == delta.numel(),
              "one int32 input base per entry");
  const int64_t entries = delta.numel();
  const int32_t* xb = x_base.data_ptr<int32_t>();
  for (int64_t e = 0; e < entries; ++e)
    TORCH_CHECK(xb[e] >= 0 && xb[e] + (length - 1) * width_in < x.numel(), "input index out of range");
  float* out = y.data_ptr<float>();
  const float* in = x.data_ptr<float>();
  const int32_t* yb = y_base.data_ptr<int32_t>();
  const float* d = delta.data_ptr<float>();
  // entry by entry, position inside: each entry walks x and y with a constant stride, which the hardware
  // prefetchers follow (position by position, every access is a scattered miss); an output still receives its
  // entries in entry order, as with the torch operators
  for (int64_t e = 0; e < entries; ++e) {
    float* o = out + yb[e];
    const float* i = in + xb[e];
    const float scale = d[e];
    for (int64_t t = 0; t < length; ++t) o[t * width_out] += scale * i[t * width_in];
  }
}

// Linear bias entries: y[y_base[e] + t * width_out] += delta[e] for t < length.
void bias_delta(torch::Tensor y, torch::Tensor y_base, torch::Tensor delta, int64_t length, int64_t width_out) {
  check(y, y_base, delta, length, width_out);
  float* out = y.data_ptr<float>();
  const int32_t* yb = y_base.data_ptr<int32_t>();
  const float* d = delta.data_ptr<float>();
  const int64_t entries = delta.numel();
  for (int64_t e = 0; e < entries; ++e) {
    float* o = out + yb[e];
    for (int64_t t = 0; t < length; ++t) o[t * width_out] += d[e];
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_delta", &linear_delta, py::call_guard<py::gil_scoped_release>());
  m.def("bias_delta", &bias_delta, py::call_guard<py::gil_scoped_release>());
}
"""

_NAME = "skillgraft_mixed_kernel"
# no fused multiply-add: the product is rounded before the sum, as with the torch operators
_FLAGS = ["-O3", "-ffp-contract=off"]


class Kernels(Protocol):
    """The compiled functions (``_SOURCE``): each adds one Linear module's entries of a batch plan to its output."""

    def linear_delta(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        y_base: torch.Tensor,
        x_base: torch.Tensor,
        delta: torch.Tensor,
        length: int,
        width_out: int,
        width_in: int,
    ) -> None: ...

    def bias_delta(
        self, y: torch.Tensor, y_base: torch.Tensor, delta: torch.Tensor, length: int, width_out: int
    ) -> None: ...


_lock = threading.Lock()
_build_lock = threading.Lock()
_compiled: Kernels | None = None
_started = False
_failure: str | None = None


def compiled() -> Kernels | None:
    """The compiled kernels, or None while they are being built or where they could not be."""
    return _compiled


def usable(y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> bool:
    """Whether the kernels take these tensors (else the torch operators do the same sums)."""
    return (
        y.device.type == "cpu"
        and y.dtype == x.dtype == delta.dtype == torch.float32
        and index.dtype == torch.int32
        and x.is_contiguous()
    )


def start_build() -> None:
    """Build (or load from the cache) in a background thread, once per process."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
    threading.Thread(target=build, name="skillgraft-kernel-build", daemon=True).start()


def build() -> Kernels | None:
    """Load the kernels from the cache, or compile them first, in this thread; the kernels, or None (the reason
    logged and kept in ``failure``). Safe to call from several threads and processes at once."""
    global _compiled, _failure
    with _build_lock:
        if _compiled is not None:
            return _compiled
        try:
            module = _load_cached() or _compile()
        except Exception as exc:  # no compiler, no ninja, a read-only cache: the torch operators serve instead
            _failure = f"{type(exc).__name__}: {exc}"
            log.warning("the mixed-path kernel could not be built; using torch operators (%s)", _failure)
            return None
        _compiled, _failure = module, None
        log.info("the mixed-path kernel is ready")
        return _compiled


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    # a build is only good for this source and flags, this torch, this Python and this machine's architecture
    key = hashlib.sha256(f"{_SOURCE}{_FLAGS}".encode()).hexdigest()[:12]
    tag = f"{key}-torch{torch.__version__}-{sys.implementation.cache_tag}-{platform.machine()}"
    return Path(root) / "skillgraft" / f"{_NAME}-{tag}"


def _load_cached() -> Kernels | None:
    library = _cache_dir() / f"{_NAME}.so"
    if not library.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(_NAME, library)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken or foreign build: compile again and replace it
        log.warning("the cached mixed-path kernel did not load (%s); compiling it again", exc)
        return None
    return module  # type: ignore[return-value]


def _compile() -> Kernels:
    """Compile into a folder of this attempt's own, then rename it into place: no lock to wait on, so a builder
    killed half-way (torch's own build folders keep a lock file then) leaves nothing that stalls the next one."""
    from torch.utils.cpp_extension import load_inline

    # ninja from this environment's scripts folder, when the interpreter was started without activating it
    scripts = Path(sys.executable).parent
    if shutil.which("ninja") is None and (scripts / "ninja").is_file():
        os.environ["PATH"] = f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"
    final = _cache_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{_NAME}-", dir=final.parent))
    try:
        module = load_inline(_NAME, cpp_sources=_SOURCE, extra_cflags=_FLAGS, build_directory=str(scratch))
        # torch renames a module built again in one process (name_v1, …): only the expected file is published
        if (scratch / f"{_NAME}.so").is_file():
            scratch.chmod(0o755)  # mkdtemp's 0700 would hide it from other users of a shared cache
            if final.exists() and not (final / f"{_NAME}.so").is_file():
                shutil.rmtree(final, ignore_errors=True)  # a broken build in the way
            with contextlib.suppress(OSError):  # another process published its build first: keep that one
                scratch.rename(final)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return module  # type: ignore[no-any-return]


def failure() -> str | None:
    return _failure

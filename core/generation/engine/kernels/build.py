"""Building the engine's C++ kernels into torch operators, once per machine, and loading them.

A kernel is one `.cpp` file beside this module that registers its operators with
`TORCH_LIBRARY_FRAGMENT(kobot, …)`. It is compiled with the machine's C++ compiler (`CXX`,
else `c++`) against the installed torch, for the instruction set this CPU has (`isa_level`), into
`KOBOT_ENGINE_KERNEL_DIR` (default `~/.cache/kobot/kernels`). The library's name holds a digest
of the source, the torch version and the flags, so a changed kernel or torch builds anew and a
built one is loaded without a compiler (the Docker image builds them at image build time).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from core.generation.cpu_features import cpu_flags

__all__ = [
    "ISA_FLAGS",
    "KernelBuildError",
    "build_all",
    "build_library",
    "default_kernel_dir",
    "isa_level",
    "library_path",
    "load_library",
]

SOURCES = Path(__file__).resolve().parent
ISA_FLAGS = {
    "x86-64-v4": ("-march=x86-64-v4",),
    "x86-64-v3": ("-march=x86-64-v3",),
    "generic": (),
}
"""Compiler flags by instruction-set level: AVX-512 (the kernels' hand-vectorized path),
AVX2 + FMA, and whatever the compiler targets by default (other CPUs)."""
X86_MACHINES = ("x86_64", "AMD64")
V4_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"})
V3_FLAGS = frozenset({"avx2", "fma", "bmi2", "f16c", "movbe"})
COMMON_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-std=c++20")
"""No -ffast-math: on GCC 12 a shared library built with it sets flush-to-zero for the whole
process when loaded."""
BUILD_TIMEOUT_S = 300
_build_lock = threading.Lock()


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled (no compiler, or it failed: its last lines say why)."""


@dataclass(frozen=True, slots=True)
class Toolchain:
    compiler: str
    isa: str

    @classmethod
    def for_isa(cls, isa: str, compiler: str | None = None) -> Toolchain:
        """`compiler`, else `CXX`, else `c++`, targeting `isa`."""
        return cls(compiler or os.environ.get("CXX") or "c++", isa)

    @property
    def flags(self) -> tuple[str, ...]:
        return compiler_flags(self.isa)


def compiler_flags(isa: str) -> tuple[str, ...]:
    return (*COMMON_FLAGS, *ISA_FLAGS[isa])


def isa_level(flags: frozenset[str] | None = None, machine: str | None = None) -> str:
    """The highest `ISA_FLAGS` level this CPU runs."""
    machine = machine or platform.machine()
    if machine not in X86_MACHINES:
        return "generic"
    flags = cpu_flags() if flags is None else flags
    if flags >= V4_FLAGS:
        return "x86-64-v4"
    if flags >= V3_FLAGS:
        return "x86-64-v3"
    return "generic"


def default_kernel_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kobot" / "kernels"


def library_path(name: str, directory: Path, isa: str) -> Path:
    """Where kernel `name` built for `isa` against this torch lives in `directory`."""
    digest = hashlib.sha256()
    digest.update((SOURCES / f"{name}.cpp").read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(compiler_flags(isa)).encode())
    return directory / f"{name}-{isa}-{digest.hexdigest()[:16]}.so"


def build_library(name: str, target: Path, toolchain: Toolchain) -> None:
    """Compile `name.cpp` into `target` (written whole or not at all)."""
    compiler = shutil.which(toolchain.compiler)
    if compiler is None:
        raise KernelBuildError(f"no C++ compiler {toolchain.compiler!r} on PATH (set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    torch_dir = Path(torch.__file__).resolve().parent
    lib_dir = torch_dir / "lib"
    abi = int(torch.compiled_with_cxx11_abi())
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [
            compiler, *toolchain.flags, "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}",
            str(SOURCES / f"{name}.cpp"), f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}",
            "-lc10", "-ltorch_cpu", "-o", str(built),
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KernelBuildError(f"{compiler}: {error}") from error
        if result.returncode != 0:
            tail = " | ".join(result.stderr.strip().splitlines()[-3:])
            raise KernelBuildError(f"{compiler} failed ({result.returncode}): {tail}")
        os.replace(built, target)


def load_library(name: str, directory: Path | None = None, compiler: str | None = None) -> Path:
    """Load kernel `name`'s operators into torch, building it first when `directory` has no
    build of it for this CPU and torch; the library's path. KernelBuildError when it cannot be
    built. A process loads each kernel once (torch refuses a second registration): a build in
    another folder is only made, the one loaded first serves."""
    directory = directory or default_kernel_dir()
    toolchain = Toolchain.for_isa(isa_level(), compiler)
    path = library_path(name, directory, toolchain.isa)
    with _build_lock:
        if not path.is_file():
            build_library(name, path, toolchain)
        if name not in _loaded:
            torch.ops.load_library(str(path))
            _loaded[name] = path
    return path


_loaded: dict[str, Path] = {}


def build_all(directory: Path, compiler: str | None = None) -> list[Path]:
    """Every kernel for every instruction-set level this compiler targets on this machine
    (x86-64: v4, v3 and generic), so that an image runs on whichever CPU it lands on."""
    levels = list(ISA_FLAGS) if platform.machine() in X86_MACHINES else ["generic"]
    built = []
    for source in sorted(SOURCES.glob("*.cpp")):
        for isa in levels:
            path = library_path(source.stem, directory, isa)
            if not path.is_file():
                build_library(source.stem, path, Toolchain.for_isa(isa, compiler))
            built.append(path)
    return built


def main(argv: list[str] | None = None) -> None:
    """`python -m core.generation.engine.kernels.build [DIR]`: build every kernel ahead of time
    into DIR (default: KOBOT_ENGINE_KERNEL_DIR, else the cache folder)."""
    args = sys.argv[1:] if argv is None else argv
    fallback = os.environ.get("KOBOT_ENGINE_KERNEL_DIR") or default_kernel_dir()
    directory = Path(args[0] if args else fallback)
    for path in build_all(directory):
        print(path)


if __name__ == "__main__":
    main()

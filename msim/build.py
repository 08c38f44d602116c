"""Build msim kernel libraries: .metal files + runtime -> one cached shared object.

Pipeline per .metal file: `clang -E` with the MSL shim, the generator (gen.py), then clang as C++.
Everything is cached under build/msim/ by content hash, so an unchanged rebuild costs one hash
of the inputs. Modes: "default" (run), "tsan" (run with ThreadSanitizer fibers; load under
LD_PRELOAD of the TSan runtime, see tsan_runtime()) and "strict" (compile check only: MSL
address spaces become distinct clang address spaces, as the Metal compiler keeps them apart).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from . import gen

MSIM_DIR = Path(__file__).resolve().parent
REPO_ROOT = MSIM_DIR.parent
INCLUDE_DIR = MSIM_DIR / "include"
RUNTIME_DIR = MSIM_DIR / "runtime"
MODES = ("default", "tsan", "strict")

# half/bfloat must round after every operation, as on the GPU (clang keeps float otherwise).
_KERNEL_FLAGS = [
    "-x",
    "c++",
    "-std=c++17",
    "-fPIC",
    "-fno-exceptions",
    "-fno-rtti",
    "-fstack-clash-protection",
    "-gline-tables-only",
    "-Wno-unknown-attributes",
    "-Wno-ignored-attributes",
    "-Wno-duplicate-decl-specifier",
    "-Xclang",
    "-ffloat16-excess-precision=none",
    "-Xclang",
    "-fbfloat16-excess-precision=none",
]
_RUNTIME_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-g1"]


class BuildError(Exception):
    """Compilation failed; the message carries clang's diagnostics (pointing at .metal lines)."""


def clang() -> str:
    exe = os.environ.get("MSIM_CLANG") or shutil.which("clang++-19") or shutil.which("clang++")
    if not exe:
        raise BuildError("msim needs clang 19 (apt-get install clang-19)")
    return exe


def build_root() -> Path:
    return Path(os.environ.get("MSIM_BUILD_DIR", REPO_ROOT / "build" / "msim"))


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise BuildError(proc.stderr.strip() or proc.stdout.strip() or f"failed: {cmd[0]}")
    return proc.stdout


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _tree_bytes(*dirs: Path) -> list[bytes]:
    out = []
    for d in dirs:
        for f in sorted(Path(d).rglob("*")):
            if f.is_file() and f.suffix not in (".pyc",) and "__pycache__" not in f.parts:
                out.append(str(f.relative_to(d)).encode() + b"\0" + f.read_bytes())
    return out


def _display_path(path: Path) -> str:
    """Repo-relative path when possible, so diagnostics read `kernels/foo.metal:12`."""
    try:
        return os.path.relpath(path, REPO_ROOT)
    except ValueError:
        return str(path)


def preprocess(metal: Path, include_dirs=(), mode: str = "default", defines=()) -> str:
    cmd = [clang(), "-E", "-x", "c++", "-std=c++17", "-nostdinc", "-isystem", str(INCLUDE_DIR)]
    cmd += ["-D__METAL_VERSION__=310", "-D__METAL_MACOS__=1", "-D__HAVE_BFLOAT__=1", "-D__MSIM__=1"]
    cmd += [f"-I{d}" for d in include_dirs] + [f"-D{d}" for d in defines]
    if mode == "strict":
        cmd.append("-DMSIM_STRICT")
    cmd.append(_display_path(metal))
    return _run(cmd, cwd=REPO_ROOT)


def translate(metal: Path, include_dirs=(), mode: str = "default", defines=()):
    """(generated C++, kernels) for one .metal file."""
    text = preprocess(metal, include_dirs, mode, defines)
    try:
        return gen.generate(text, (str(INCLUDE_DIR),))
    except gen.GenError as e:
        raise BuildError(str(e)) from None


def _kernel_cmd(src: Path, mode: str, out: Path | None) -> list[str]:
    cmd = [clang()] + _KERNEL_FLAGS + ["-I", str(INCLUDE_DIR)]
    if mode == "strict":
        return cmd + ["-DMSIM_STRICT", "-fsyntax-only", str(src)]
    cmd += ["-O1", "-fsanitize=thread"] if mode == "tsan" else ["-O2"]
    return cmd + ["-c", str(src), "-o", str(out)]


def _compile_runtime(mode: str) -> list[Path]:
    flags = _RUNTIME_FLAGS + (["-DMSIM_TSAN"] if mode == "tsan" else [])
    key = _digest(clang(), flags, *_tree_bytes(RUNTIME_DIR, INCLUDE_DIR))
    out_dir = build_root() / f"runtime-{mode}-{key}"
    sources = sorted(RUNTIME_DIR.glob("*.cpp"))
    objs = [out_dir / (s.stem + ".o") for s in sources]
    if all(o.exists() for o in objs):
        return objs
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)

    def one(src: Path) -> None:
        _run(
            [
                clang(),
                *flags,
                "-I",
                str(INCLUDE_DIR),
                "-c",
                str(src),
                "-o",
                str(tmp / (src.stem + ".o")),
            ]
        )

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(one, sources))
    if out_dir.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(out_dir)
    return objs


def _compile_kernels(metal: Path, include_dirs, mode: str, defines) -> Path | None:
    src_text, _ = translate(metal, include_dirs, mode, defines)
    key = _digest(clang(), _KERNEL_FLAGS, mode, src_text)
    out_dir = build_root() / "obj"
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / f"{metal.stem}-{mode}-{key}.cpp"
    obj = src.with_suffix(".ok" if mode == "strict" else ".o")  # strict: a stamp, no object
    if obj.exists():
        return None if mode == "strict" else obj
    # Write-then-rename everywhere: parallel test processes may build the same file.
    src_tmp = src.with_name(src.name + f".tmp{os.getpid()}")
    src_tmp.write_text(src_text)
    src_tmp.rename(src)
    tmp = obj.with_name(obj.name + f".tmp{os.getpid()}")
    try:
        _run(_kernel_cmd(src, mode, tmp))
    except BuildError as e:
        raise BuildError(f"{_display_path(metal)}: msim compile failed:\n{e}") from None
    if mode == "strict":
        obj.touch()
        return None
    tmp.rename(obj)
    return obj


def _input_key(metal_files, include_dirs, mode, defines) -> str:
    parts = [clang(), mode, sorted(defines), _KERNEL_FLAGS, _RUNTIME_FLAGS]
    for m in metal_files:
        parts += [_display_path(m), m.read_bytes()]
    parts += _tree_bytes(*include_dirs, INCLUDE_DIR, RUNTIME_DIR)
    generator = [MSIM_DIR / "gen.py", *sorted(MSIM_DIR.glob("msl_*.py")), Path(__file__)]
    parts += [f.read_bytes() for f in generator]
    return _digest(*parts)


def _expand(paths) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p).resolve()
        out += sorted(p.rglob("*.metal")) if p.is_dir() else [p]
    if not out:
        raise BuildError("no .metal files given")
    return out


def build(metal_files, include_dirs=(), mode: str = "default", defines=()) -> Path:
    """Compile .metal files (or folders of them) into one msim library; returns its path."""
    if mode not in ("default", "tsan"):
        raise ValueError(f"build mode must be default or tsan, not {mode!r}")
    files = _expand(metal_files)
    include_dirs = [Path(d).resolve() for d in include_dirs]
    key = _input_key(files, include_dirs, mode, defines)
    lib = build_root() / f"lib-{mode}-{key}" / "libmsim_kernels.so"
    if lib.exists():
        return lib
    runtime = _compile_runtime(mode)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        objs = list(pool.map(lambda m: _compile_kernels(m, include_dirs, mode, defines), files))
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(lib.name + f".tmp{os.getpid()}")
    builtins = _run([clang(), "--rtlib=compiler-rt", "-print-libgcc-file-name"]).strip()
    cmd = [clang(), "-shared", "-o", str(tmp), *map(str, objs), *map(str, runtime)]
    cmd += ["-lboost_context", "-lpthread", "-ldl", "-lm", builtins]  # builtins: __bf16 helpers
    _run(cmd)
    tmp.rename(lib)
    return lib


def check(metal_files, include_dirs=(), defines=()) -> list[str]:
    """Strict-mode compile check: returns the files checked; BuildError on the first failure."""
    files = _expand(metal_files)
    include_dirs = [Path(d).resolve() for d in include_dirs]
    for m in files:
        _compile_kernels(m, include_dirs, "strict", defines)
    return [_display_path(m) for m in files]


def tsan_runtime() -> str:
    """Path of the ThreadSanitizer runtime to LD_PRELOAD when loading a tsan-mode library."""
    path = Path(_run([clang(), "-print-file-name=libclang_rt.tsan-x86_64.so"]).strip())
    if not path.is_absolute() or not path.exists():
        raise BuildError("TSan runtime not found (apt-get install libclang-rt-19-dev)")
    return str(path)

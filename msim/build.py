"""Build msim kernel libraries: .metal files + runtime -> one cached shared object.

Pipeline per .metal file: `clang -E` with the MSL shim, the generator (gen.py), then clang as C++.
Everything is cached under build/msim/ by content hash, so an unchanged rebuild costs one hash
of the inputs. Modes: "default" (run), "tsan" (run with ThreadSanitizer fibers; load under
LD_PRELOAD of the TSan runtime, see tsan_runtime()), "strict" (compile check only: MSL
address spaces become distinct clang address spaces, as the Metal compiler keeps them apart) and
"syntax" (compile check only, of what the default mode would build).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from . import gen

MSIM_DIR = Path(__file__).resolve().parent
REPO_ROOT = MSIM_DIR.parent
INCLUDE_DIR = MSIM_DIR / "include"
RUNTIME_DIR = MSIM_DIR / "runtime"
MODES = ("default", "tsan", "strict", "syntax")
_CHECK_MODES = ("strict", "syntax")  # compile checks: a stamp file, no object

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
    "-flax-vector-conversions=none",  # MSL has no implicit conversions between vector types
    "-Xclang",
    "-ffloat16-excess-precision=none",
    "-Xclang",
    "-fbfloat16-excess-precision=none",
]
_RUNTIME_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-g1"]


class BuildError(Exception):
    """Compilation failed; the message carries clang's diagnostics (pointing at .metal lines)."""


MIN_CLANG = 17  # oldest major version with every builtin the shim uses; CI runs clang 19
_clang_checked: dict[str, str] = {}


def clang() -> str:
    """The clang++ msim compiles with (MSIM_CLANG, else clang++-19, else clang++), checked once."""
    exe = os.environ.get("MSIM_CLANG") or shutil.which("clang++-19") or shutil.which("clang++")
    if not exe:
        raise BuildError(
            "msim needs clang 19 to compile Metal sources: apt-get install clang-19 "
            "libclang-rt-19-dev (or set MSIM_CLANG); `python -m msim doctor` lists every "
            "requirement"
        )
    if exe not in _clang_checked:
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
            major = int(re.search(r"clang version (\d+)", out.stdout).group(1))
        except (OSError, subprocess.CalledProcessError, AttributeError, ValueError):
            raise BuildError(
                f"msim needs clang 19: '{exe} --version' did not name a clang"
            ) from None
        if major < MIN_CLANG:
            raise BuildError(
                f"msim needs clang {MIN_CLANG} or newer (tested with 19); {exe} is clang {major}: "
                "apt-get install clang-19"
            )
        _clang_checked[exe] = str(major)
    return exe


def _in_checkout() -> bool:
    """msim runs from a source tree (the metalcore repository), not an installed package."""
    return (REPO_ROOT / ".git").exists() or (REPO_ROOT / "msim" / "pyproject.toml").exists()


def build_root() -> Path:
    """Where libraries are cached: MSIM_BUILD_DIR, else build/msim of the source tree, else the
    user's cache folder for an installed msim."""
    if os.environ.get("MSIM_BUILD_DIR"):
        return Path(os.environ["MSIM_BUILD_DIR"])
    if _in_checkout():
        return REPO_ROOT / "build" / "msim"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "msim"


def _base_dir() -> Path:
    """Paths in diagnostics are shown relative to this (the source tree, or the working dir)."""
    return REPO_ROOT if _in_checkout() else Path.cwd()


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
    """Relative path when possible, so diagnostics read `kernels/foo.metal:12`."""
    try:
        return os.path.relpath(path, _base_dir())
    except ValueError:
        return str(path)


def preprocess(metal: Path, include_dirs=(), mode: str = "default", defines=()) -> str:
    cmd = [clang(), "-E", "-x", "c++", "-std=c++17", "-nostdinc", "-isystem", str(INCLUDE_DIR)]
    cmd += ["-D__METAL__=1", "-D__METAL_VERSION__=310", "-D__METAL_MACOS__=1"]
    cmd += ["-D__HAVE_BFLOAT__=1", "-D__MSIM__=1"]
    # MSL's scalar and vector types and address-space keywords exist before any #include (ggml's
    # shared header uses int32_t ahead of <metal_stdlib>), as with Apple's compiler.
    cmd += ["-include", "metal_types"]
    cmd += [f"-I{d}" for d in include_dirs] + [f"-D{d}" for d in defines]
    if mode == "strict":
        cmd.append("-DMSIM_STRICT")
    cmd.append(_display_path(metal))
    return _run(cmd, cwd=_base_dir())


def translate(metal: Path, include_dirs=(), mode: str = "default", defines=(), kernels=None):
    """(generated C++, kernels) for one .metal file (`kernels`: host names to keep, or all)."""
    text = preprocess(metal, include_dirs, mode, defines)
    try:
        return gen.generate(text, (str(INCLUDE_DIR),), set(kernels) if kernels else None)
    except gen.GenError as e:
        raise BuildError(str(e)) from None


def _kernel_cmd(src: Path, mode: str, out: Path | None) -> list[str]:
    cmd = [clang()] + _KERNEL_FLAGS + ["-I", str(INCLUDE_DIR)]
    if mode == "strict":
        return cmd + ["-DMSIM_STRICT", "-fsyntax-only", str(src)]
    if mode == "syntax":
        return cmd + ["-fsyntax-only", str(src)]
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
        try:
            list(pool.map(one, sources))
        except BuildError as e:
            if "boost/context" in str(e):
                raise BuildError(
                    "msim needs Boost.Context (its simulated threads are fibers): apt-get install "
                    f"libboost-context-dev\n{e}"
                ) from None
            raise
    if out_dir.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(out_dir)
    return objs


def _compile_kernels(metal: Path, include_dirs, mode: str, defines, kernels=None) -> Path | None:
    src_text, found = translate(metal, include_dirs, mode, defines, kernels)
    _found_names.update(k.host_name for k in found)
    key = _digest(clang(), _KERNEL_FLAGS, mode, src_text)
    out_dir = build_root() / "obj"
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / f"{metal.stem}-{mode}-{key}.cpp"
    obj = src.with_suffix(".ok" if mode in _CHECK_MODES else ".o")  # checks: a stamp
    if obj.exists():
        return None if mode in _CHECK_MODES else obj
    # Write-then-rename everywhere: parallel test processes may build the same file.
    src_tmp = src.with_name(src.name + f".tmp{os.getpid()}")
    src_tmp.write_text(src_text)
    src_tmp.rename(src)
    tmp = obj.with_name(obj.name + f".tmp{os.getpid()}")
    try:
        _run(_kernel_cmd(src, mode, tmp))
    except BuildError as e:
        raise BuildError(f"{_display_path(metal)}: msim compile failed:\n{e}") from None
    if mode in _CHECK_MODES:
        obj.touch()
        return None
    _check_mutable_storage(tmp, src_text)
    tmp.rename(obj)
    return obj


_found_names: set[str] = set()  # host names translated by this process (for `kernels=` checks)
_WRITABLE_SECTIONS = (".data", ".bss", ".tdata", ".tbss")
# objdump -t: value, 7 flag characters, section, size and name.
_SYMBOL_RE = re.compile(r"^[0-9a-fA-F]+ (.{7}) (\S+)\s+[0-9a-fA-F]+ (.*)$")


def _objdump() -> str:
    exe = shutil.which("llvm-objdump-19") or shutil.which("llvm-objdump") or shutil.which("objdump")
    if not exe:
        raise BuildError(
            "msim needs llvm-objdump (apt-get install llvm-19) to inspect kernel objects"
        )
    return exe


def _check_mutable_storage(obj: Path, generated: str) -> None:
    """Reject kernel code that defines mutable storage outside threads: a `static` local or a
    program-scope variable that is not `constant`. MSL has neither; in msim one copy would be
    shared by every simulated thread of every threadgroup, a program the GPU never runs."""
    found = []
    for line in _run([_objdump(), "-t", str(obj)]).splitlines():
        m = _SYMBOL_RE.match(line)
        if not m or "O" not in m.group(1):  # data objects only
            continue
        section, name = m.group(2), m.group(3).split()[-1]
        if "__msim" in name or section.startswith(".data.rel.ro"):
            continue
        if section.startswith(_WRITABLE_SECTIONS):
            found.append(name)
    if not found:
        return
    demangled = _run(["llvm-cxxfilt-19" if shutil.which("llvm-cxxfilt-19") else "c++filt", *found])
    var = demangled.splitlines()[0].rsplit("::", 1)[-1]
    where = ""
    for t in gen.tokenize(generated, (str(INCLUDE_DIR),)):
        if t.kind == "id" and t.text == var and not t.shim:
            where = f"{t.file}:{t.line}: "
            break
    raise BuildError(
        f"{where}error: '{demangled.splitlines()[0]}' is mutable storage shared by all threads (a "
        "`static` local or a program-scope variable that is not `constant`): MSL has no such "
        "variables and msim would run a different program; make it `constant`, `constexpr` or a "
        "local"
    )


def _input_key(metal_files, include_dirs, mode, defines, kernels=None) -> str:
    parts = [clang(), mode, sorted(defines), _KERNEL_FLAGS, _RUNTIME_FLAGS, sorted(kernels or [])]
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


def build(metal_files, include_dirs=(), mode: str = "default", defines=(), kernels=None) -> Path:
    """Compile .metal files (or folders of them) into one msim library; returns its path.

    `kernels`: host names to build (explicit instantiations of the others are skipped); all
    when None. A name that no file defines is an error.
    """
    if mode not in ("default", "tsan"):
        raise ValueError(f"build mode must be default or tsan, not {mode!r}")
    files = _expand(metal_files)
    include_dirs = [Path(d).resolve() for d in include_dirs]
    key = _input_key(files, include_dirs, mode, defines, kernels)
    lib = build_root() / f"lib-{mode}-{key}" / "libmsim_kernels.so"
    if lib.exists():
        return lib
    runtime = _compile_runtime(mode)
    _found_names.clear()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        objs = list(
            pool.map(lambda m: _compile_kernels(m, include_dirs, mode, defines, kernels), files)
        )
    missing = sorted(set(kernels or ()) - _found_names)
    if missing:
        raise BuildError(
            f"no kernel with host name {', '.join(map(repr, missing))} in the files given"
        )
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(lib.name + f".tmp{os.getpid()}")
    builtins = _run([clang(), "--rtlib=compiler-rt", "-print-libgcc-file-name"]).strip()
    cmd = [clang(), "-shared", "-o", str(tmp), *map(str, objs), *map(str, runtime)]
    cmd += ["-lboost_context", "-lpthread", "-ldl", "-lm", builtins]  # builtins: __bf16 helpers
    _run(cmd)
    tmp.rename(lib)
    return lib


def check(metal_files, include_dirs=(), defines=(), mode: str = "strict") -> list[str]:
    """Compile check of each file: "strict" (address spaces kept apart, the CI lint) or
    "syntax" (what the default mode builds, without code generation). Returns the files
    checked; BuildError on the first failure."""
    if mode not in _CHECK_MODES:
        raise ValueError(f"check mode must be strict or syntax, not {mode!r}")
    files = _expand(metal_files)
    include_dirs = [Path(d).resolve() for d in include_dirs]
    for m in files:
        _compile_kernels(m, include_dirs, mode, defines)
    return [_display_path(m) for m in files]


def toolchain_report() -> list[tuple[str, bool, str]]:
    """(requirement, satisfied, detail or how to install) for everything msim runs."""
    out = []
    try:
        exe = clang()
        out.append(("clang++ (compiles kernels)", True, f"{exe}, clang {_clang_checked[exe]}"))
    except BuildError as e:
        return [("clang++ (compiles kernels)", False, str(e))]
    probe = subprocess.run(
        [exe, "-x", "c++", "-E", "-", "-o", os.devnull],
        input="#include <boost/context/detail/fcontext.hpp>\n",
        capture_output=True,
        text=True,
        check=False,
    )
    out.append(
        (
            "Boost.Context (fibers)",
            probe.returncode == 0,
            "found" if probe.returncode == 0 else "apt-get install libboost-context-dev",
        )
    )
    for what, flag, pkg in (
        ("compiler-rt builtins (bfloat helpers)", "--rtlib=compiler-rt", "libclang-rt-19-dev"),
        ("ThreadSanitizer runtime (race mode)", "-print-file-name=libclang_rt.tsan-x86_64.so", ""),
    ):
        if pkg:
            cmd = [exe, flag, "-print-libgcc-file-name"]
        else:
            cmd = [exe, flag]
        path = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        ok = bool(path) and Path(path).is_absolute() and Path(path).exists()
        out.append((what, ok, path if ok else "apt-get install libclang-rt-19-dev"))
    objdump = next(
        (
            shutil.which(x)
            for x in ("llvm-objdump-19", "llvm-objdump", "objdump")
            if shutil.which(x)
        ),
        None,
    )
    out.append(
        ("objdump (mutable-storage check)", bool(objdump), objdump or "apt-get install llvm-19")
    )
    symbolizer = shutil.which("llvm-symbolizer-19") or shutil.which("llvm-symbolizer")
    out.append(
        (
            "llvm-symbolizer (file:line in fault reports; optional)",
            bool(symbolizer),
            symbolizer or "apt-get install llvm-19",
        )
    )
    return out


def tsan_runtime() -> str:
    """Path of the ThreadSanitizer runtime to LD_PRELOAD when loading a tsan-mode library."""
    path = Path(_run([clang(), "-print-file-name=libclang_rt.tsan-x86_64.so"]).strip())
    if not path.is_absolute() or not path.exists():
        raise BuildError("TSan runtime not found (apt-get install libclang-rt-19-dev)")
    return str(path)

"""A dispatch described in a small JSON file, for `msim run --spec FILE.json`.

    {
      "source": "saxpy.metal",                    # or a list; relative to the JSON file
      "include": ["."], "defines": ["N=4"],        # optional
      "kernel": "saxpy",                           # host name
      "threads": [1000], "threads_per_threadgroup": [64],   # or "threadgroups": [...]
      "buffers": {
        "0": {"dtype": "float32", "shape": [1000], "fill": "randn", "seed": 1},
        "1": {"dtype": "float32", "data": [1, 2, 3]},
        "2": {"npy": "y.npy"},
        "3": {"dtype": "float32", "value": 2.5},                # setBytes of one scalar
        "4": {"struct": [["n", "uint32", 1000], ["eps", "float32", 1e-6]]}  # C layout
      },
      "threadgroup_memory": {"0": 1024},
      "constants": {"0": true},
      "options": {"uninit_check": 1},
      "save": {"2": "out.npy"},
      "check": {"2": {"npy": "want.npy", "rtol": 1e-5, "atol": 0}}
    }

Fills: randn, rand (uniform [0, 1)), zeros, ones, arange, or a number. `check` compares a buffer
after the run with a reference (`npy` file or `data` list) and fails the command on mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .build import build as _build_library
from .host import Library, MetalError

_KEYS = {
    "source",
    "include",
    "defines",
    "kernel",
    "threads",
    "threadgroups",
    "threads_per_threadgroup",
    "buffers",
    "threadgroup_memory",
    "constants",
    "options",
    "save",
    "check",
}


class SpecError(ValueError):
    """The JSON file does not describe a dispatch; the message names the key."""


def load(path) -> tuple[dict, Path]:
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"{path}: {e}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: expected a JSON object")
    unknown = set(spec) - _KEYS
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
    for key in ("source", "kernel", "threads_per_threadgroup"):
        if key not in spec:
            raise SpecError(f"{path}: missing '{key}'")
    if ("threads" in spec) == ("threadgroups" in spec):
        raise SpecError(f"{path}: give exactly one of 'threads' and 'threadgroups'")
    return spec, path.parent


def _dtype(name: str, where: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        raise SpecError(f"{where}: unknown dtype '{name}'") from None


def _buffer(desc: dict, base: Path, where: str):
    if not isinstance(desc, dict):
        raise SpecError(f"{where}: expected an object")
    if "npy" in desc:
        return np.ascontiguousarray(np.load(base / desc["npy"]))
    if "struct" in desc:
        fields, values = [], []
        for f in desc["struct"]:
            if len(f) != 3:
                raise SpecError(f"{where}: struct fields are [name, dtype, value]")
            name, dt, value = f
            fields.append((name, _dtype(dt, where)))
            values.append(tuple(value) if isinstance(value, list) else value)
        dt = np.dtype(fields, align=True)  # the C layout the kernel's struct has
        return np.array(tuple(values), dtype=dt).tobytes()
    dt = _dtype(desc.get("dtype", "float32"), where)
    if "value" in desc:
        return np.array(desc["value"]).astype(dt)[()]
    if "data" in desc:
        return np.ascontiguousarray(np.array(desc["data"]).astype(dt))
    if "shape" not in desc:
        raise SpecError(f"{where}: give 'npy', 'struct', 'value', 'data' or 'shape' (with 'fill')")
    shape = tuple(int(v) for v in desc["shape"])
    fill = desc.get("fill", "zeros")
    rng = np.random.default_rng(desc.get("seed", 0))
    if fill == "randn":
        arr = rng.standard_normal(shape)
    elif fill == "rand":
        arr = rng.random(shape)
    elif fill == "zeros":
        arr = np.zeros(shape)
    elif fill == "ones":
        arr = np.ones(shape)
    elif fill == "arange":
        arr = np.arange(int(np.prod(shape))).reshape(shape)
    elif isinstance(fill, (int, float)):
        arr = np.full(shape, fill)
    else:
        raise SpecError(f"{where}: unknown fill {fill!r}")
    return np.ascontiguousarray(arr.astype(dt))


def _files(spec: dict, base: Path) -> list[Path]:
    src = spec["source"]
    return [base / s for s in ([src] if isinstance(src, str) else src)]


def library_path(spec: dict, base: Path, mode: str = "default") -> Path:
    return _build_library(
        _files(spec, base),
        [base / d for d in spec.get("include", [])],
        mode=mode,
        defines=spec.get("defines", []),
        kernels=[spec["kernel"]],
    )


def run(spec: dict, base: Path, lib: Library | None = None) -> dict:
    """Builds (cached) and dispatches; returns {index: argument} after the run. Raises
    MetalError for detector findings and SpecError for a failed `check`."""
    lib = lib or Library(library_path(spec, base))
    args = {int(k): _buffer(v, base, f"buffers.{k}") for k, v in spec.get("buffers", {}).items()}
    grid = (
        {"threads": spec["threads"]}
        if "threads" in spec
        else {"threadgroups": spec["threadgroups"]}
    )
    lib.dispatch(
        spec["kernel"],
        args,
        spec["threads_per_threadgroup"],
        tg_mem={int(k): int(v) for k, v in spec.get("threadgroup_memory", {}).items()},
        constants={int(k): v for k, v in spec.get("constants", {}).items()},
        **grid,
        **spec.get("options", {}),
    )
    for k, ref in spec.get("check", {}).items():
        got = args[int(k)]
        want = np.load(base / ref["npy"]) if "npy" in ref else np.array(ref["data"])
        try:
            np.testing.assert_allclose(
                np.asarray(got, np.float64).reshape(-1),
                np.asarray(want, np.float64).reshape(-1),
                rtol=ref.get("rtol", 1e-6),
                atol=ref.get("atol", 0.0),
            )
        except AssertionError as e:
            raise SpecError(f"check of buffer({k}) failed:{e}") from None
    for k, out in spec.get("save", {}).items():
        np.save(base / out, args[int(k)])
    return args


__all__ = ["SpecError", "load", "run", "library_path", "MetalError"]

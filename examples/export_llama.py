"""Export demo: a small Llama-style model built from metalcore ops, exported and reloaded.

    python examples/export_llama.py --out export-demo [--no-aoti]

1. builds ``metalcore.nn.TinyLlama`` (RMSNorm, fused add+RMSNorm, rope and SwiGLU as
   ``metalcore::`` ops),
2. ``torch.export`` with a dynamic batch and sequence length -> ``tiny_llama.pt2``,
3. loads the ``.pt2`` in a fresh Python process that only does ``import metalcore`` and checks
   that its logits (for a new batch/sequence size) equal the eager model's,
4. compiles the exported program with AOTInductor into ``tiny_llama_aoti.pt2`` and runs that
   package in a fresh process too (the metalcore ops are called from the compiled code, so the
   process must ``import metalcore``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

import metalcore
from metalcore.nn import TinyLlama, TinyLlamaConfig

EXPECTED_OPS = ("metalcore.rmsnorm", "metalcore.fused_add_rmsnorm", "metalcore.swiglu")


def _fresh_process(script: str) -> None:
    # The child finds metalcore the way this process did (installed, or this checkout).
    root = str(Path(metalcore.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, env=env)


def export_demo(out: Path, aoti: bool = True) -> dict[str, float]:
    """Runs the demo; returns the max |logit difference| of each reloaded artifact."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig()).eval()
    example = torch.randint(0, model.config.vocab_size, (2, 16))
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", min=2, max=512)
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch, 1: seq},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    missing = [op for op in EXPECTED_OPS if not any(t.startswith(op) for t in targets)]
    if missing:
        raise RuntimeError(f"exported graph lacks {missing}")
    if metalcore._dispatch.has_kernel("rope", "cpu") and not any(
        t.startswith("metalcore.rope") for t in targets
    ):
        raise RuntimeError("exported graph lacks metalcore.rope")

    pt2 = out / "tiny_llama.pt2"
    torch.export.save(ep, pt2)
    inputs = torch.randint(0, model.config.vocab_size, (3, 37))  # another batch and length
    torch.save(inputs, out / "inputs.pt")
    with torch.no_grad():
        expected = model(inputs)
    diffs = {}

    _fresh_process(
        f"""
        import torch, metalcore
        ep = torch.export.load({str(pt2)!r})
        ids = torch.load({str(out / "inputs.pt")!r})
        with torch.no_grad():
            torch.save(ep.module()(ids), {str(out / "logits_pt2.pt")!r})
        """
    )
    diffs["pt2"] = float((torch.load(out / "logits_pt2.pt") - expected).abs().max())

    if aoti:
        package = out / "tiny_llama_aoti.pt2"
        torch._inductor.aoti_compile_and_package(ep, package_path=str(package))
        _fresh_process(
            f"""
            import torch, metalcore
            runner = torch._inductor.aoti_load_package({str(package)!r})
            ids = torch.load({str(out / "inputs.pt")!r})
            with torch.no_grad():
                torch.save(runner(ids), {str(out / "logits_aoti.pt")!r})
            """
        )
        diffs["aoti"] = float((torch.load(out / "logits_aoti.pt") - expected).abs().max())
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="export-demo")
    parser.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor package")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    diffs = export_demo(Path(args.out), aoti=not args.no_aoti)
    for name, d in diffs.items():
        print(f"{name}: max |logits - eager| = {d:.3g}")
    print(f"done in {time.perf_counter() - t0:.1f} s; artifacts in {args.out}/")
    # float32 end to end: the reloaded program runs the same kernels, so only the compiled
    # (AOTInductor) matmul/softmax fusions may reorder float32 sums.
    return 0 if all(d < 1e-4 for d in diffs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

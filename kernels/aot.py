"""Ahead-of-time proof of the Triton kernels for NVIDIA targets, on a machine without a GPU.

    python -m vllm_qe.kernels.aot [--out docs/benchmarks] [--arch 80 90] [--jobs 2]

Every kernel configuration the runtime can select (`variants()`: each kernel x its launch configurations x weight
bits x activation quantization) is compiled with `triton.compile` for sm_80 and sm_90 with the specialization a
real launch gets (16-byte aligned pointers, sizes divisible by 16 marked `tt.divisibility=16`, unit strides as
constants). Per variant: registers and spills from `ptxas -v` (the ptxas Triton itself picks for the arch), shared
memory from the metadata, and the instruction mix of the cubin's SASS (`cuobjdump -sass`): vectorized global loads
(`LDG.E.128`/`LDG.E.64`), scalar ones, async copies (`LDGSTS`), tensor-core instructions (HMMA/IMMA = mma.sync,
HGMMA/IGMMA = Hopper wgmma). Per benchmark shape (Qwen2-VL-2B/7B linear layers, M in {1, 16, 128, 2048}): the
configuration the runtime picks, the programs launched, and the bytes a call must move against the HBM floor.
Writes `static-sm80.md` / `static-sm90.md`; exits non-zero when any variant spills registers.
Results are cached per (kernel source hash, specialization, options, arch, Triton version) under
`$VLLM_QE_AOT_CACHE` (default `~/.cache/vllm_qe/aot`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default; set to keep 3.9 quiet about it

# HBM bandwidth (vendor datasheet figures) and SM counts of the reference part per architecture.
DEVICES = {
    80: {"name": "A100-SXM4-80GB", "hbm_gbs": 2039.0, "sms": 108},
    90: {"name": "H100-SXM5-80GB", "hbm_gbs": 3350.0, "sms": 132},
}
# (model, layer, N out, K in): the language-model linear layers of Qwen2-VL-2B / 7B (as in kernels/bench.py).
BENCH_SHAPES = [
    ("2b", "qkv", 2048, 1536), ("2b", "o", 1536, 1536), ("2b", "gate_up", 17920, 1536), ("2b", "down", 1536, 8960),
    ("7b", "qkv", 4608, 3584), ("7b", "o", 3584, 3584), ("7b", "gate_up", 37888, 3584), ("7b", "down", 3584, 18944),
]
BENCH_M = (1, 16, 128, 2048)
SASS_KEYS = ("LDG.E.128", "LDG.E.64", "LDG.E", "LDGSTS.128", "LDGSTS", "UTMALDG", "HMMA", "IMMA", "HGMMA", "IGMMA")


@dataclass(frozen=True)
class Variant:
    """One compilation: a `@triton.jit` kernel with every argument typed or constant.

    `types`: argument name -> Triton type (`*bf16`, `i32`, ...) for runtime arguments; `constexprs`: name -> value
    (constexpr parameters and arguments specialized to a constant, e.g. unit strides). Runtime arguments not in
    `unaligned` get `tt.divisibility=16` (pointers from the caching allocator; sizes/strides of the benchmark
    shapes are multiples of 16)."""

    kernel: str
    config: str
    fn: Any
    types: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    unaligned: frozenset[str] = frozenset({"M"})
    tags: dict[str, Any] = field(default_factory=dict)

    def key(self, arch: int) -> str:
        import triton

        h = hashlib.sha256()
        for part in (source_hash(self.fn), sorted(self.types.items()), sorted(self.constexprs.items()),
                     sorted(self.unaligned), self.num_warps, self.num_stages, arch, triton.__version__):
            h.update(repr(part).encode())
        return h.hexdigest()[:32]


def source_hash(fn: Any) -> str:
    """Hash of a kernel's source and of every `@triton.jit` function its module namespace holds (the helpers it
    can call). Unlike `JITFunction.cache_key` it ignores line numbers, so edits elsewhere in the file keep the
    cache."""
    from triton.runtime.jit import JITFunction

    helpers = sorted(v.src for v in fn.__globals__.values() if isinstance(v, JITFunction))
    return hashlib.sha256(repr((fn.src, helpers)).encode()).hexdigest()


def _cache_dir() -> str:
    d = os.environ.get("VLLM_QE_AOT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vllm_qe", "aot")
    os.makedirs(d, exist_ok=True)
    return d


def _nvidia_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def toolchain_available() -> bool:
    """True when this Triton install ships the NVIDIA backend binaries the report needs."""
    return os.path.exists(_nvidia_bin("cuobjdump")) and os.path.exists(_nvidia_bin("ptxas"))


def _compile(v: Variant, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(v.fn.arg_names)
    missing = [n for n in names if n not in v.types and n not in v.constexprs]
    if missing:
        raise ValueError(f"{v.kernel} [{v.config}]: arguments without a type or value: {missing}")
    sig = {n: ("constexpr" if n in v.constexprs else v.types[n]) for n in names}
    constexprs = {(names.index(n),): val for n, val in v.constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in v.types and n not in v.unaligned and v.types[n] not in ("fp32", "fp16", "bf16", "i1")}
    src = ASTSource(fn=v.fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": v.num_warps, "num_stages": v.num_stages})


def sass_counts(sass: str) -> dict[str, int]:
    """Opcode counts of interest in a `cuobjdump -sass` listing (each key counts its own opcode family only:
    `LDG.E` = non-vectorized global loads, `LDGSTS` = non-128-bit async copies)."""
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass, re.M)
    out = dict.fromkeys(SASS_KEYS, 0)
    for op in ops:
        parts = op.split(".")
        base = parts[0]
        if base == "LDG":
            width = "128" if "128" in parts else "64" if "64" in parts else ""
            out[f"LDG.E.{width}" if width else "LDG.E"] += 1
        elif base == "LDGSTS":
            out["LDGSTS.128" if "128" in parts else "LDGSTS"] += 1
        elif base in out:
            out[base] += 1
    out["instructions"] = len(ops)
    return out


def compile_static(v: Variant, arch: int, use_cache: bool = True) -> dict[str, Any]:
    """Registers, spills, shared memory and SASS mix of `v` compiled for sm_`arch` (cached)."""
    path = os.path.join(_cache_dir(), f"{v.key(arch)}.json")
    if use_cache and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from triton.backends.nvidia.compiler import get_ptxas

    t0 = time.perf_counter()
    k = _compile(v, arch)
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        info = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", ptx, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout

    def num(pattern: str) -> int:
        m = re.search(pattern, info)
        return int(m.group(1)) if m else 0

    res = {"regs": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
           "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
           "shared": int(k.metadata.shared), "num_warps": int(k.metadata.num_warps), "sass": sass_counts(sass),
           "compile_s": round(time.perf_counter() - t0, 2)}
    with open(path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(path + ".tmp", path)
    return res


def variants() -> list[Variant]:
    """Every configuration the runtime can launch (see each kernel module's launch table)."""
    from vllm_qe.kernels.triton import catalog

    return catalog.aot_variants()


_WORK: list[Variant] = []


def _work(item: tuple[int, int]) -> dict[str, Any]:
    i, arch = item
    return compile_static(_WORK[i], arch)


def collect(vs: Sequence[Variant], archs: Sequence[int], jobs: int) -> dict[int, list[dict[str, Any]]]:
    """Static results per arch, in `vs` order (compiled `jobs` at a time; forked workers share the variant list)."""
    global _WORK
    _WORK = list(vs)
    items = [(i, a) for a in archs for i in range(len(vs))]
    if jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as ex:
            flat = list(ex.map(_work, items))
    else:
        flat = [_work(it) for it in items]
    return {a: flat[k * len(vs):(k + 1) * len(vs)] for k, a in enumerate(archs)}


def _mma(s: dict[str, int]) -> str:
    kinds = [k for k in ("HGMMA", "IGMMA", "HMMA", "IMMA") if s[k]]
    return " ".join(f"{k}x{s[k]}" for k in kinds) or "none"


def static_table(vs: Sequence[Variant], res: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| kernel | configuration | regs | spills (st/ld B) | smem KiB | LDG.E.128 | LDG.E.64 | LDG scalar | "
             "LDGSTS.128 | LDGSTS other | MMA (SASS count) | instr |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in zip(vs, res):
        s = r["sass"]
        lines.append(f"| {v.kernel} | {v.config} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['shared'] / 1024:.1f} | {s['LDG.E.128']} | {s['LDG.E.64']} | {s['LDG.E']} | "
                     f"{s['LDGSTS.128']} | {s['LDGSTS']} | {_mma(s)} | {s['instructions']} |")
    return lines


def launch_table(arch: int, launches: Callable[[int], list[dict[str, Any]]]) -> list[str]:
    dev = DEVICES[arch]
    bw = dev["hbm_gbs"] * 1e9
    lines = [f"| kernel | model | layer | N x K | M | configuration | programs | waves on {dev['sms']} SMs | "
             "min bytes (MiB) | tiled bytes, no L2 reuse (MiB) | HBM floor (us) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in launches(dev["sms"]):
        lines.append(
            f"| {row['kernel']} | {row['model']} | {row['layer']} | {row['n']}x{row['k']} | {row['m']} | "
            f"{row['config']} | {row['programs']} | {row['programs'] / dev['sms']:.2f} | "
            f"{row['bytes'] / 2**20:.2f} | {row['tiled_bytes'] / 2**20:.2f} | {row['bytes'] / bw * 1e6:.1f} |")
    return lines


def render(arch: int, vs: Sequence[Variant], res: Sequence[dict[str, Any]], argv: Sequence[str]) -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    from vllm_qe.kernels.triton import catalog

    dev = DEVICES[arch]
    ptxas = get_ptxas(arch)
    lines = [
        f"# Static report: Triton kernels compiled for sm_{arch} (no GPU)",
        "",
        f"Generated by `{' '.join(['python -m vllm_qe.kernels.aot', *argv])}` with Triton {triton.__version__}, "
        f"ptxas {ptxas.version.strip()} (`{os.path.basename(ptxas.path)}`, the one Triton uses for sm_{arch}). "
        "Every configuration the runtime can launch is compiled with a real launch's specialization; registers and "
        "spills from `ptxas -v`, instruction counts from `cuobjdump -sass` of the cubin (static counts, not "
        "executed instructions). The command fails when any variant spills.",
        "",
        f"Bandwidth floor: {dev['name']} HBM {dev['hbm_gbs']:.0f} GB/s (datasheet), {dev['sms']} SMs.",
        "",
        "## Compiled variants",
        "",
        *catalog.LEGEND,
        "",
        *static_table(vs, res),
        "",
        "## Launches at the benchmark shapes",
        "",
        *catalog.LAUNCH_NOTES,
        "",
        *launch_table(arch, catalog.launches),
        "",
    ]
    return "\n".join(lines)


def spills(vs: Sequence[Variant], results: dict[int, list[dict[str, Any]]]) -> list[str]:
    """Descriptions of every variant that spills registers (empty = none)."""
    return [f"sm_{a}: {v.kernel} [{v.config}] spills {r['spill_stores']} B / {r['spill_loads']} B"
            for a, res in results.items() for v, r in zip(vs, res) if r["spill_stores"] or r["spill_loads"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/benchmarks", help="folder for static-sm80.md / static-sm90.md")
    p.add_argument("--arch", nargs="+", type=int, default=[80, 90], choices=sorted(DEVICES))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default=None, help="also write every variant's results here (for tests)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter replaces @triton.jit: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        args = argv if argv is not None else sys.argv[1:]
        return subprocess.call([sys.executable, "-m", "vllm_qe.kernels.aot", *args], env=env)
    if not toolchain_available():
        print("this Triton install has no NVIDIA backend binaries (ptxas, cuobjdump)", file=sys.stderr)
        return 2
    vs = variants()
    t0 = time.perf_counter()
    results = collect(vs, a.arch, a.jobs)
    shown = [f"--arch {' '.join(map(str, a.arch))}"] if sorted(a.arch) != sorted(DEVICES) else []
    os.makedirs(a.out, exist_ok=True)
    for arch, res in results.items():
        path = os.path.join(a.out, f"static-sm{arch}.md")
        with open(path, "w") as f:
            f.write(render(arch, vs, res, shown))
        print(f"wrote {path} ({len(vs)} variants)")
    print(f"{len(vs) * len(a.arch)} compilations checked in {time.perf_counter() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({str(arch): [{"kernel": v.kernel, "config": v.config, "tags": v.tags,
                                    "swap_ab": bool(v.constexprs.get("SWAP_AB", False)),
                                    "block_m": v.constexprs.get("BLOCK_M"), **r} for v, r in zip(vs, res)]
                       for arch, res in results.items()}, f)
    bad = spills(vs, results)
    for line in bad:
        print("SPILL:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

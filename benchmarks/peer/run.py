"""Peer benchmark: vllm-qe GPTQ against llm-compressor 0.14's GPTQ on the same fixtures, the same calibration
tensors and the same layers, scored by one evaluator, over several calibration sets; writes
docs/peer-comparison.md.

    .venv/bin/python benchmarks/peer/run.py [--fixtures A,B] [--settings w4g128s,...] [--calib-seeds 0,1,2,3,4,5]
                                            [--vllm-qe-params JSON]

Steps (all outputs under --work, default runs/peer; the llm-compressor venv outside the repo):
1. the llm-compressor venv (default /work/venvs/llmc: llmcompressor 0.14 + what it pins, the local CPU torch
   wheel; idempotent — reused when it imports llmcompressor 0.14);
2. the fixtures (fixtures.py: the project's tiny-model builder, resized, briefly trained; cached by spec);
then for each calibration seed S (outer loop) and fixture:
3. vllm-qe GPTQ per setting through its CLI (`vllm-qe calibrate ... --seed S --method gptq --method-params JSON`),
   wrapped by project_calibrate.py, which dumps the calibration chats the project feeds its model the first time
   (calib-...-seedS.safetensors: seed S's calibration set, given to both tools) and afterwards checks every run
   with that seed against that dump;
4. llm-compressor `oneshot` + `GPTQModifier` (its defaults) per setting on exactly those tensors
   (llmc_quantize.py, in its venv; checkpoints cached, keyed by setting, ignore list and the dump's sha256);
5. evaluate.py on every checkpoint; summary.json and the doc are rewritten after every (seed, fixture) step, so
   a run cut short keeps what it finished (`--doc-only` rewrites the doc from summary.json).
The table: per tool the mean KL over seeds, the KL ratio as the geometric mean of the per-seed ratios, with a
two-level paired bootstrap interval (calibration seeds and held-out chats resampled; see `bootstrap`).
Always rerun: vllm-qe calibration and the evaluation. Cached: venv, fixtures, calibration dumps, llm-compressor
checkpoints (`--rerun-llmc` recomputes them, e.g. to retime both under the same machine load).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shlex
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SETTINGS: dict[str, tuple[int, int, bool, str]] = {
    "w4g128s": (4, 128, True, "W4 g128 symmetric"),
    "w4g128a": (4, 128, False, "W4 g128 asymmetric"),
    "w4g32s": (4, 32, True, "W4 g32 symmetric"),
    "w3g128s": (3, 128, True, "W3 g128 symmetric"),
}
DEFAULT_FIXTURES = "qwen2_5_vl-odd,qwen2_vl-256,qwen2_5_vl-odd-outliers"
DEFAULT_SEEDS = "0,1,2,3,4,5"  # three sets gave a "clearly worse" row that six did not (commentary.md)
ESTIMATE_MIN_PER_SEED = 5  # measured: 3 seeds in 12-16 min on the shared 2 cores (the doc's "took N min")
LLMC_SPEC = "llmcompressor==0.14.*"
LM_LINEAR = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.(.+)\.weight$")


def log(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str], logfile: Path, env: dict | None = None) -> float:
    """Run `cmd`, output to `logfile`; wall seconds. Raises with the log's tail on failure."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(logfile, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            cwd=REPO).returncode
    if rc != 0:
        tail = "".join(logfile.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"command failed (rc {rc}), log {logfile}:\n{tail}")
    return time.time() - t0


# -- 1. the llm-compressor venv -----------------------------------------------------------------------------------
def llmc_versions(venv: Path) -> dict | None:
    py = venv / "bin" / "python"
    if not py.is_file():
        return None
    code = ("import json, llmcompressor, compressed_tensors, transformers, torch; print(json.dumps({"
            "'llmcompressor': llmcompressor.__version__, 'compressed_tensors': compressed_tensors.__version__,"
            "'transformers': transformers.__version__, 'torch': torch.__version__}))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    v = json.loads(r.stdout.strip().splitlines()[-1])
    return v if v["llmcompressor"].startswith("0.14") else None


def ensure_llmc_venv(venv: Path, logs: Path) -> dict:
    """llm-compressor 0.14 in its own venv. torch first, pinned to the local CPU wheel (2.13.0): with no torch
    installed, llmcompressor's own `torch` requirement would pull a multi-GB CUDA build."""
    v = llmc_versions(venv)
    if v:
        log(f"llm-compressor venv {venv}: {v}")
        return v
    if venv.resolve().is_relative_to(REPO.resolve()):
        raise SystemExit(f"{venv}: keep the llm-compressor venv outside the repository")
    log(f"building the llm-compressor venv at {venv} (minutes)")
    sh(["python3", "-m", "venv", str(venv)], logs / "venv-create.log")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    sh(pip + ["--upgrade", "pip"], logs / "venv-pip.log")
    sh(pip + ["torch==2.13.0"], logs / "venv-torch.log")
    sh(pip + [LLMC_SPEC], logs / "venv-llmcompressor.log")
    v = llmc_versions(venv)
    if not v:
        raise SystemExit(f"{venv}: llmcompressor 0.14 does not import after installation (logs in {logs})")
    return v


# -- layer selection --------------------------------------------------------------------------------------------
def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (no tensor data read)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def layer_plan(fixture: Path, group_size: int) -> tuple[list[str], list[str]]:
    """(the ignore list given to both tools, the expected quantized modules as `layers.N.<path>`): language-model
    linears whose in-features are a multiple of the group size; lm_head and the vision tower excluded."""
    shapes = safetensors_shapes(fixture / "model.safetensors")
    lm = {f"layers.{m[1]}.{m[2]}": s for k, s in shapes.items() if (m := LM_LINEAR.match(k)) and len(s) == 2}
    bad = sorted({key.split(".", 2)[2] for key, s in lm.items() if s[1] % group_size})
    keep = sorted(k for k, s in lm.items() if not s[1] % group_size)
    ignore = ["lm_head", "re:.*visual.*"] + [r"re:.*\.layers\.\d+\." + re.escape(p) for p in bad]
    return ignore, keep


def canonical(name: str) -> str:
    """`...layers.N.<path>` from a checkpoint or in-memory module name (the two tools' spellings differ)."""
    m = re.search(r"(?:^|\.)(layers\.\d+\..+)$", name)
    if not m or "visual" in name:
        return "NOT-LM:" + name
    return m[1]


# -- 3./4. calibration --------------------------------------------------------------------------------------------
def run_vllm_qe(py: str, fixture: Path, out: Path, setting: str, params: str, ignore: list[str], calib: Path,
                num_samples: int, seed: int, logs: Path, reuse: bool = False, extra: str = "") -> dict:
    bits, gs, sym, _ = SETTINGS[setting]
    cli = [str(fixture), "--out", str(out), "--method", "gptq", "--wbits", str(bits), "--group-size", str(gs),
           "--method-params", params, "--calib", "builtin:vqa", "--num-samples", str(num_samples), "--seed", str(seed),
           "--overwrite", "--no-resume", "--quiet"] + (["--symmetric"] if sym else []) + shlex.split(extra)
    for pat in ignore:
        cli += ["--ignore", pat]
    report = out.with_name(out.name + ".peer.json")
    code = git_state()
    if reuse and report.is_file() and (out / "vllm_qe_report.json").is_file():
        r = json.loads(report.read_text())
        if r["cli_args"] == cli and r["identity"].get("verified"):
            proj = json.loads((out / "vllm_qe_report.json").read_text())
            return {"process_seconds": r.get("process_seconds"), "span_seconds": model_span(proj),
                    "identity": r["identity"], "cli": "vllm-qe calibrate " + shlex.join(cli), "cached": True,
                    "code": r.get("code")}
    wall = sh([py, str(HERE / "project_calibrate.py"), "--chats", str(calib), "--report", str(report), "--", *cli],
              logs / f"vllm-qe-{setting}-seed{seed}.log")
    r = json.loads(report.read_text())
    r["process_seconds"] = round(wall, 2)
    r["code"] = code if code == git_state() else f"changed during the run (started at {code})"
    report.write_text(json.dumps(r, indent=1))
    proj = json.loads((out / "vllm_qe_report.json").read_text())
    return {"process_seconds": round(wall, 2), "span_seconds": model_span(proj), "identity": r["identity"],
            "cli": "vllm-qe calibrate " + shlex.join(cli), "cached": False, "code": r["code"]}


def model_span(report: dict) -> float:
    """vllm-qe's span comparable to llm-compressor's: model load to written checkpoint, less the time spent loading
    the processor, reading the calibration images and encoding the chats (`data_seconds`; llm-compressor is handed
    the encoded tensors)."""
    return round(report["seconds"] - report.get("data_seconds", 0.0), 2)


def run_llmc(venv: Path, fixture: Path, out: Path, setting: str, ignore: list[str], calib: Path, calib_sha: str,
             logs: Path, rerun: bool, seed: int) -> dict:
    bits, gs, sym, _ = SETTINGS[setting]
    key = {"setting": setting, "ignore": ignore, "calib_sha256": calib_sha, "fixture": fixture.name,
           "fixture_sha256": hashlib.sha256((fixture / "model.safetensors").read_bytes()).hexdigest()}
    stamp = out / "peer_key.json"
    if not rerun and stamp.is_file() and json.loads(stamp.read_text()) == key and (out / "peer_run.json").is_file():
        r = json.loads((out / "peer_run.json").read_text())
        r["cached"] = True
        return r
    cmd = [str(venv / "bin" / "python"), str(HERE / "llmc_quantize.py"), str(fixture), str(calib), str(out),
           "--wbits", str(bits), "--group-size", str(gs), "--ignore", json.dumps(ignore)] + (
        ["--symmetric"] if sym else [])
    wall = sh(cmd, logs / f"llmc-{setting}-seed{seed}.log")
    r = json.loads((out / "peer_run.json").read_text())
    r["process_seconds"] = round(wall, 2)
    (out / "peer_run.json").write_text(json.dumps(r, indent=1))
    stamp.write_text(json.dumps(key))
    r["cached"] = False
    return r


# -- 5./6. statistics and the document ----------------------------------------------------------------------------
def chat_stats(r: dict, w: list[int], part: str = "") -> tuple[float, float]:
    """(KL, top-1) of one checkpoint over the held-out chats, token-weighted, chat i counted `w[i]` times;
    `part` "" for every position, "_text" for the text positions only."""
    pos = sum(wi * p for wi, p in zip(w, r["positions" + part]))
    return (sum(wi * k for wi, k in zip(w, r["kl_sum" + part])) / pos,
            sum(wi * t for wi, t in zip(w, r["top1_hits" + part])) / pos)


CHAT_KEYS = ("kl_sum", "top1_hits", "positions", "kl_sum_text", "top1_hits_text", "positions_text")
TEXT_KL_FLOOR = 1e-9  # below it a tool's mean text-position KL is float64 round-off: no ratio is formed


def bootstrap(qs: list[dict], ls: list[dict], resample_seeds: bool = True, n_boot: int = 2000,
              seed: int = 0, part: str = "") -> dict:
    """Point values and 95 % percentile intervals for one (fixture, setting) calibrated on S seeds.

    `qs[s]` / `ls[s]`: per-chat sums (`kl_sum`, `top1_hits`, `positions`) of vllm-qe's / llm-compressor's
    checkpoint calibrated on calibration set s, all scored on the same n held-out chats. Statistics: each tool's
    KL and top-1 as the mean over seeds; the KL ratio as the geometric mean over seeds of the per-seed ratios
    vllm-qe / llm-compressor. One bootstrap replicate draws S seeds with replacement (unless `resample_seeds` is
    false) and, independently, n chats with replacement; the same chat draw is used for every drawn seed and both
    tools (seeds and chats are crossed, not nested: every checkpoint is scored on the same chats), so the ratio's
    interval is paired and covers both the calibration-set and the held-out-chat sampling noise. `part`: as in
    `chat_stats`; where either tool's KL is below TEXT_KL_FLOOR the ratio is None."""
    n, n_seeds = len(qs[0]["positions"]), len(qs)
    for r in (*qs, *ls):
        if r["positions" + part] != qs[0]["positions" + part]:
            raise ValueError("bootstrap: the checkpoints were not scored on the same held-out chats")
    rng = random.Random(seed)

    def stat(ss: list[int], w: list[int]) -> tuple[float | None, ...]:
        q = [chat_stats(qs[s], w, part) for s in ss]
        ll = [chat_stats(ls[s], w, part) for s in ss]
        k = len(ss)
        ratio = (None if min(x[0] for x in q + ll) < TEXT_KL_FLOOR else
                 math.exp(sum(math.log(a[0] / b[0]) for a, b in zip(q, ll)) / k))
        return (sum(a[0] for a in q) / k, sum(b[0] for b in ll) / k, ratio,
                sum(a[1] for a in q) / k, sum(b[1] for b in ll) / k)

    full = stat(list(range(n_seeds)), [1] * n)
    reps: list[tuple[float, ...]] = []
    for _ in range(n_boot):
        ss = [rng.randrange(n_seeds) for _ in range(n_seeds)] if resample_seeds else list(range(n_seeds))
        w = [0] * n
        for _ in range(n):
            w[rng.randrange(n)] += 1
        reps.append(stat(ss, w))
    out = dict(zip(("kl_q", "kl_l", "ratio", "top1_q", "top1_l"), full))
    if not reps:
        return out
    for j, key in enumerate(("kl_q", "kl_l", "ratio")):
        if any(r[j] is None for r in reps):
            out[key + "_ci"] = None
            continue
        v = sorted(r[j] for r in reps)
        out[key + "_ci"] = (v[int(0.025 * n_boot)], v[int(0.975 * n_boot) - 1])
    return out


def aggregate(results: dict) -> list[dict]:
    """Table rows from `summary["results"][fixture][setting][seed]` (whatever seeds exist for each row)."""
    rows = []
    for fx, per_setting in results.items():
        for st in SETTINGS:
            if st not in per_setting:
                continue
            seeds = sorted(per_setting[st], key=int)
            es = [per_setting[st][s] for s in seeds]
            qs, ls = [e["vllm_qe"] for e in es], [e["llmc"] for e in es]

            def mean(key: str, es: list[dict] = es) -> float:
                return sum(e[key] for e in es) / len(es)

            rows.append({
                "fixture": fx, "setting": st, "seeds": [int(s) for s in seeds], "n_layers": es[0]["n_layers"],
                "both": bootstrap(qs, ls), "chats_only": bootstrap(qs, ls, resample_seeds=False),
                "text": bootstrap(qs, ls, part="_text") if "kl_sum_text" in qs[0] else None,
                "per_seed": [{"seed": int(s), **bootstrap([e["vllm_qe"]], [e["llmc"]]),
                              "text": (bootstrap([e["vllm_qe"]], [e["llmc"]], n_boot=0, part="_text")
                                       if "kl_sum_text" in e["vllm_qe"] else None),
                              "t_vllm_qe": e["t_vllm_qe"], "t_llmc": e["t_llmc"]} for s, e in zip(seeds, es)],
                "text_share": tuple(sum(sum(r["kl_sum_text"]) / sum(r["kl_sum"]) for r in rs) / len(rs)
                                    for rs in (qs, ls)) if "kl_sum_text" in qs[0] else None,
                "bpw_vllm_qe": mean("bpw_vllm_qe"), "bpw_llmc": mean("bpw_llmc"), "bpw16_llmc": mean("bpw16_llmc"),
                "bpw_varies": len({(e["bpw_vllm_qe"], e["bpw_llmc"]) for e in es}) > 1,
                "t_vllm_qe": mean("t_vllm_qe"), "t_llmc": mean("t_llmc"),
                "checks": {int(s): e["checks"] for s, e in zip(seeds, es)}})
    return rows


def fmt_kl(x: float) -> str:
    """4 decimals, or 3 significant digits below 0.001."""
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.3g}"


def fmt_ci(ci: tuple[float, float], digits: int | None = None) -> str:
    if digits is None:
        return f"[{fmt_kl(ci[0])}, {fmt_kl(ci[1])}]"
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def git_state() -> str:
    """HEAD, plus a fingerprint of uncommitted changes to the project's code (others edit the shared tree)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    paths = ["--", "calibration", "vllm_qe", "kernels"]
    dirty = subprocess.run(["git", "status", "--porcelain", *paths], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    if not dirty:
        return head.stdout.strip()
    diff = subprocess.run(["git", "diff", "HEAD", *paths], capture_output=True, cwd=REPO).stdout
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", *paths], capture_output=True,
                               text=True, cwd=REPO).stdout.split()
    h = hashlib.sha256(diff)
    for f in sorted(untracked):
        h.update((REPO / f).read_bytes())
    return (f"{head.stdout.strip()} + uncommitted changes in {len(dirty.splitlines())} project file(s) "
            f"(diff sha256 {h.hexdigest()[:10]})")




def seeds_text(seeds: list[int]) -> str:
    return ",".join(map(str, seeds))


def cell_summary(rows: list[dict]) -> str:
    """The summary line's sentence on the single (row, seed) cells."""
    cells = [p["ratio"] for r in rows for p in r["per_seed"]]
    if len(cells) == len(rows):
        return ""
    return (f" Of the {len(cells)} single (row, seed) cells, vllm-qe's KL is lower in {sum(c < 1 for c in cells)}; "
            f"the tools differ by more than 1.5x in {sum(c > 1.5 or c < 1 / 1.5 for c in cells)}, vllm-qe "
            f"being the worse one in {sum(c > 1.5 for c in cells)} of them.")


def text_summary(rows: list[dict]) -> str:
    """The summary line's sentence on the text-position KL ratio."""
    rs = [r for r in rows if r["text"] is not None]
    if not rs:
        return ""
    na = [r for r in rs if r["text"]["ratio_ci"] is None]
    ok = [r for r in rs if r["text"]["ratio_ci"] is not None]
    below = sum(r["text"]["ratio_ci"][1] < 1 for r in ok)
    above = sum(r["text"]["ratio_ci"][0] > 1 for r in ok)
    return (f" At the text positions only (second table): below 1 on {below}, above 1 on {above}, straddling on "
            f"{len(ok) - below - above}" + (f", no ratio on {len(na)} (text-position KL at float64 round-off: "
                                             f"{', '.join(sorted({r['fixture'] for r in na}))})" if na else "")
            + ".")


def text_table(rows: list[dict]) -> list[str]:
    """The text-positions-only table (empty when the evaluation predates the text-position sums)."""
    rs = [r for r in rows if r["text"] is not None]
    if not rs:
        return []
    lines = [
        "",
        "**Text positions only** (the positions whose input token is not an image placeholder; same seeds, chats",
        "and two-level bootstrap as above; `n/a`: a tool's text-position KL is below "
        f"{TEXT_KL_FLOOR:g} nats, i.e. float64 round-off, so no ratio is formed):",
        "",
        "| fixture | setting | vllm-qe KL (top-1) [95 % CI] | llm-compressor KL (top-1) [95 % CI] | KL ratio vllm-qe / "
        "llmc [95 % CI, seeds + chats] | share of the all-position KL at text positions, vllm-qe / llmc |",
        "|---|---|---|---|---|---|",
    ]
    for r in rs:
        t = r["text"]
        ratio = "n/a" if t["ratio"] is None else f"**{t['ratio']:.2f}** {fmt_ci(t['ratio_ci'], 2)}"
        lines.append(
            f"| {r['fixture']} | {SETTINGS[r['setting']][3]} | {t['kl_q']:.3g} ({100 * t['top1_q']:.1f} %) "
            f"[{t['kl_q_ci'][0]:.3g}, {t['kl_q_ci'][1]:.3g}] | {t['kl_l']:.3g} ({100 * t['top1_l']:.1f} %) "
            f"[{t['kl_l_ci'][0]:.3g}, {t['kl_l_ci'][1]:.3g}] | {ratio} | "
            f"{100 * r['text_share'][0]:.1f} % / {100 * r['text_share'][1]:.1f} % |")
    return lines


def write_doc(path: Path, sm: dict) -> str:
    """docs/peer-comparison.md from a (possibly partial) summary.json: tables, summary line, commentary."""
    rows = aggregate(sm["results"])
    versions, want = sm["versions"], sm["seeds"]
    n_seeds = len(want)
    done, planned = sm.get("steps_done", 0), sm.get("steps_planned", 0)
    took = sm.get("elapsed_min")
    lines = [
        "# Peer comparison: vllm-qe GPTQ vs llm-compressor GPTQ",
        "",
        f"Regenerate (on 2 shared cores: about {ESTIMATE_MIN_PER_SEED} min per calibration seed, so about "
        f"{ESTIMATE_MIN_PER_SEED * 6} min for the",
        "default six, up to twice that when the machine is busy, with the venv and fixtures cached under",
        "`runs/peer` and `/work/venvs/llmc`, plus about 10 min to build them the first time; `--calib-seeds 0` is",
        "the quick one-seed run):",
        "",
        "```bash",
        sm["cmd"],
        "```",
        "",
        f"Run started {sm['started']} UTC"
        + (f", took {took:.0f} min" if took is not None else "")
        + f" ({done} of {planned} (seed, fixture) steps done); project code at {versions['project_git']} (a row "
        f"whose vllm-qe run saw other code says so under Checks); vllm-qe `--method-params {sm['params']}`; "
        f"calibration seeds {seeds_text(want)}.",
        f"llm-compressor venv: llmcompressor {versions['llmc']['llmcompressor']}, compressed-tensors "
        f"{versions['llmc']['compressed_tensors']}, transformers {versions['llmc']['transformers']}, torch "
        f"{versions['llmc']['torch']}; project venv: transformers {versions['project']['transformers']}, torch "
        f"{versions['project']['torch']}.",
        "",
    ]
    below = [r for r in rows if r["both"]["ratio_ci"][1] < 1]
    above = [r for r in rows if r["both"]["ratio_ci"][0] > 1]
    fast = [r for r in rows if r["t_vllm_qe"] <= 1.5 * r["t_llmc"]]
    at_or_below = [r for r in rows if r["both"]["ratio"] <= 1]
    partial = [r for r in rows if r["seeds"] != want]
    lines.append(
        f"**Summary of this run** (computed by run.py, {len(rows)} rows, each calibrated by both tools on "
        f"{n_seeds} calibration set(s)): the 95 % interval of the KL ratio vllm-qe / llm-compressor (calibration "
        f"sets and held-out chats resampled) lies entirely below 1 (vllm-qe clearly better) on {len(below)} rows, "
        f"entirely above 1 (vllm-qe clearly worse) on {len(above)}, and straddles 1 (no clear difference) on "
        f"{len(rows) - len(below) - len(above)}; the point ratio (geometric mean over seeds) is at or below 1 on "
        f"{len(at_or_below)} of {len(rows)}; vllm-qe's mean calibration time is within 1.5x of llm-compressor's on "
        f"{len(fast)} of {len(rows)}."
        + cell_summary(rows)
        + text_summary(rows)
        + (f" **Partial:** {len(partial)} row(s) have fewer seeds than requested (see the Seeds column)."
           if partial else ""))
    lines += [
        "",
        "| fixture | setting | layers | seeds | vllm-qe GPTQ KL (top-1) [95 % CI] | llm-compressor GPTQ KL (top-1) "
        "[95 % CI] | KL ratio vllm-qe / llmc [95 % CI, seeds + chats] (chats only) | bits/weight vllm-qe / llmc "
        "(16-bit scales) | calibration s vllm-qe / llmc (ratio) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, c = r["both"], r["chats_only"]
        lines.append(
            f"| {r['fixture']} | {SETTINGS[r['setting']][3]} | {r['n_layers']} | {seeds_text(r['seeds'])} | "
            f"{fmt_kl(b['kl_q'])} ({100 * b['top1_q']:.1f} %) {fmt_ci(b['kl_q_ci'])} | "
            f"{fmt_kl(b['kl_l'])} ({100 * b['top1_l']:.1f} %) {fmt_ci(b['kl_l_ci'])} | "
            f"**{b['ratio']:.2f}** {fmt_ci(b['ratio_ci'], 2)} ({fmt_ci(c['ratio_ci'], 2)}) | "
            f"{r['bpw_vllm_qe']:.3f} / {r['bpw_llmc']:.3f} ({r['bpw16_llmc']:.3f})"
            f"{' (varies by seed!)' if r['bpw_varies'] else ''} | "
            f"{r['t_vllm_qe']:.1f} / {r['t_llmc']:.1f} ({r['t_vllm_qe'] / r['t_llmc']:.2f}x) |")
    lines += [
        "",
        "Columns: KL(P_FP || P_Q) in nats, full vocabulary, teacher-forced, averaged over every position of the",
        "held-out chats (token-weighted); top-1: share of those positions where the quantized model's argmax equals",
        "the FP model's. Each (fixture, setting) is calibrated by both tools on each calibration set (one per seed,",
        "see below); a tool's KL and top-1 are the means over seeds, the KL ratio is the geometric mean over seeds",
        "of the per-seed ratios vllm-qe / llm-compressor (below 1: vllm-qe closer to the FP model).",
        "**What the intervals cover** (95 %, percentile, 2000 replicates of a two-level bootstrap): each replicate",
        "draws the calibration seeds with replacement and, independently, the held-out chats with replacement; the",
        "same chat draw serves every drawn seed and both tools (every checkpoint is scored on the same chats), so",
        "the ratio's interval is paired and covers both the calibration-set noise (which 32 calibration chats were",
        "drawn) and the evaluation noise (which held-out chats). It does not cover the fixture (two fixed models)",
        "or the held-out chats' generator. The bracket after it, (chats only), keeps the seeds fixed: the interval",
        "the one-seed table used to print. "
        + (f"With {n_seeds} seeds the seed level of the bootstrap has only {math.comb(2 * n_seeds - 1, n_seeds)} "
           f"distinct draws, and a bootstrap over {n_seeds} values understates their spread (standard error by a "
           f"factor sqrt({n_seeds - 1}/{n_seeds})): read an interval that barely excludes 1 as weak evidence, "
           "and see the per-seed table." if n_seeds > 1 else
           "With one seed the two intervals coincide and the calibration-set noise is not covered at all."),
        "bits/weight: every stored per-module tensor of the quantized modules (packed",
        "integers, scales, zero points, group indices; not the 2-element `weight_shape`) over their weight count,",
        "at the dtypes in the files; in parentheses llm-compressor's with its scales counted at 16 bits (it stores",
        "scales in the model's dtype, float32 for these float32 fixtures, bfloat16 for a bfloat16 model; vllm-qe",
        "always stores float16 scales). Calibration seconds (mean over seeds): the tool's own span from loading the",
        "FP model to the written checkpoint (vllm-qe: `seconds` less `data_seconds` in `vllm_qe_report.json`, i.e.",
        "without loading the processor, reading the images and encoding the chats, which llm-compressor, handed the encoded",
        "tensors, does not do; llm-compressor: model load + `oneshot` + `save_pretrained`,",
        "timed in llmc_quantize.py); process wall times (imports included) are in",
        "`runs/peer/<fixture>/results-seed<S>.json`.",
        f"Both tools ran with OMP_NUM_THREADS={versions['threads']} (run.py sets it for both). Timings are from a",
        "2-core machine shared with other jobs: read them as rough ratios.",
    ]
    lines += text_table(rows)
    lines += [
        "",
        "### Per calibration seed",
        "",
        "| fixture | setting | seed | vllm-qe KL (top-1) | llm-compressor KL (top-1) | KL ratio [95 % CI, chats only] | "
        "text positions: KL vllm-qe / llmc (ratio) | calibration s vllm-qe / llmc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for p in r["per_seed"]:
            t = p["text"]
            tt = ("—" if t is None else f"{t['kl_q']:.3g} / {t['kl_l']:.3g} ("
                  + ("n/a" if t["ratio"] is None else f"{t['ratio']:.2f}") + ")")
            lines.append(
                f"| {r['fixture']} | {SETTINGS[r['setting']][3]} | {p['seed']} | {fmt_kl(p['kl_q'])} "
                f"({100 * p['top1_q']:.1f} %) | {fmt_kl(p['kl_l'])} ({100 * p['top1_l']:.1f} %) | "
                f"{p['ratio']:.2f} {fmt_ci(p['ratio_ci'], 2)} | {tt} | {p['t_vllm_qe']:.1f} / {p['t_llmc']:.1f} |")
    commentary = HERE / "commentary.md"
    if commentary.is_file():
        text = commentary.read_text()
        m = re.match(r"<!-- written for the run started (.+?) -->\n", text)
        lines += ["", "## Reading this run (hand-written)", ""]
        if not m or m[1] != sm["started"]:
            lines += [f"*Written for the run started {m[1] if m else '?'}; the tables above come from the run "
                      f"started {sm['started']}: check the commentary against them* "
                      "(`benchmarks/peer/commentary.md`).", ""]
        lines.append(text[m.end() if m else 0:].strip())
    lines += [
        "",
        "## Fixtures",
        "",
        "Why not the project's own init (N(0, 0.02)): its next-token distributions are nearly uniform and each",
        "layer's output is small against the residual stream, so quantization hardly moves the logits (a first",
        "run of this harness on such fixtures, trained 120-200 steps, gave GPTQ KL of 1e-6..3e-5 nats: too little",
        "to rank quantizers). See benchmarks/peer/fixtures.py for the measured sensitivities.",
        "",
    ]
    for name, f in sm["fixtures"].items():
        lines.append(f"- **{name}**: {f['desc']}")
    lines += [
        "",
        "## What is compared, and how it was checked",
        "",
        "- **Same calibration tensors, several calibration sets.** The project's CLI takes images + questions",
        "  (`--calib`), not tensors, so vllm-qe calibrates on its built-in chats (`--calib builtin:vqa",
        "  --num-samples N --seed S`, one calibration set per seed S: the `calib` split of the generated VQA task,",
        "  disjoint from the held-out `test` chats and the fixtures' `train` chats) and `project_calibrate.py`",
        "  records, through a forward pre-hook on the model the CLI loads, every input the project feeds its model",
        "  (`input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`, `mm_token_type_ids`). The first run",
        "  with seed S writes them to `calib-builtin-vqa-nN-seedS.safetensors`; every later vllm-qe run with that",
        "  seed is checked against that file tensor by tensor (dtype, shape, `torch.equal`). llm-compressor gets",
        "  exactly that seed's file through a `DataLoader` whose collate function returns the stored tensors (its",
        "  dataset preprocessing is bypassed), and `llmc_quantize.py` records the sha256 of the tensors it handed",
        "  over, compared here with the dump's.",
        "- **Same layers.** The ignore list is computed once per fixture and group size from the fixture's",
        "  safetensors (lm_head, the vision tower and the language-model linears whose in-features are not a",
        "  multiple of the group size) and passed to both (`--ignore` / `GPTQModifier(ignore=...)`). The modules",
        "  found quantized in each checkpoint's own files are compared with each other and with the plan.",
        "- **One evaluator** (`evaluate.py`, project venv): compressed-tensors checkpoints are unpacked by its own",
        "  reader (pack-quantized bitstream, zero points packed along the output dimension, optional g_idx) and",
        "  vllm-qe checkpoints by the project's format functions; the dequantized weights replace the FP weights",
        "  in a copy of the fixture, which transformers loads. For vllm-qe checkpoints the substituted model is",
        "  compared with the project's fake-quant loader (what vLLM serves) on the first chat.",
        "- **llm-compressor settings**: `GPTQModifier(config_groups={Linear: int, group, num_bits, group_size,",
        "  symmetric})` with its GPTQ defaults (actorder static, dampening_frac 0.01, block_size 128, min-max",
        "  observer), `sequential_targets` = the decoder layer class, default `quantization_aware_calibration`",
        "  (each layer calibrated on the outputs of the already-quantized ones, as vllm-qe's default",
        "  `--propagate quantized`).",
        "",
        "Checks of this run (per fixture, setting and calibration seed):",
        "",
    ]
    for r in rows:
        for s, ch in r["checks"].items():
            lines.append(f"- {r['fixture']} {r['setting']} seed {s}: {ch}")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text



def fixture_description(meta: dict) -> str:
    """One sentence on how a fixture was made, from its fixture.json (fixtures.py)."""
    spec = meta["spec"]
    if "source" in spec:
        o = spec["outliers"]
        return (f"{spec['source']} (below) with activation outliers added without changing its function "
                f"(vllm_qe/testing/outliers.py: {o['fraction']:.0%} of the channels per norm and MLP x{o['scale']:g}, "
                f"seed {o['seed']}; the logits are bit-identical): {fixture_description(meta['source'])}")
    tl = meta["train_log"]
    trained = (f"then trained {spec['steps']} AdamW steps (batch {spec['batch']}, lr {spec['lr']}) on next-token "
               "loss over the text of generated VQA chats (train split, disjoint from calibration and "
               f"evaluation; loss {tl[0]['loss']} -> {tl[-1]['loss']})." if tl else "not trained.")
    return (f"`vllm-qe tiny-model {spec['arch']} --seed {spec['seed']}` resized to language-model widths "
            f"{json.dumps(spec['text'])}, re-initialised with matrices N(0, {spec['init_gain']}^2 / fan_in) and "
            f"embeddings N(0, {spec['emb_std']}^2), {trained}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", default=DEFAULT_FIXTURES)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--calib-seeds", default=DEFAULT_SEEDS,
                   help="calibration sets (`vllm-qe calibrate --seed S`), each used by both tools; '0' is the quick "
                        "one-seed run")
    p.add_argument("--vllm-qe-params", default="{}", help="JSON passed as `--method-params` to vllm-qe's GPTQ")
    p.add_argument("--vllm-qe-args", default="", help="extra `vllm-qe calibrate` flags, e.g. '--clip mse'")
    p.add_argument("--num-calib", type=int, default=32)
    p.add_argument("--num-eval", type=int, default=48)
    p.add_argument("--work", default=str(REPO / "runs" / "peer"))
    p.add_argument("--llmc-venv", default="/work/venvs/llmc")
    p.add_argument("--project-python", default=str(REPO / ".venv" / "bin" / "python"))
    p.add_argument("--doc", default=str(REPO / "docs" / "peer-comparison.md"))
    p.add_argument("--rerun-llmc", action="store_true", help="recompute the cached llm-compressor checkpoints")
    p.add_argument("--reuse-vllm-qe", action="store_true",
                   help="reuse a vllm-qe checkpoint made by an earlier run with the same CLI arguments (default: "
                        "recalibrate, since the project's code is what changes between runs)")
    p.add_argument("--doc-only", action="store_true",
                   help="rewrite the doc from WORK/summary.json, which every finished (seed, fixture) step updates "
                        "(no calibration, no evaluation; works on a partial run)")
    a = p.parse_args()
    if a.doc_only:
        sm = json.loads((Path(a.work) / "summary.json").read_text())
        print(write_doc(Path(a.doc), sm))
        return 0
    json.loads(a.vllm_qe_params)
    fixtures = [f for f in a.fixtures.split(",") if f]
    settings = [s for s in a.settings.split(",") if s]
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"--settings: unknown {s!r}; choose from {sorted(SETTINGS)}")
    try:
        seeds = [int(s) for s in a.calib_seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--calib-seeds: expected comma-separated integers, got {a.calib_seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--calib-seeds: expected distinct integers, got {a.calib_seeds!r}")
    started = time.strftime("%Y-%m-%d %H:%M")
    t_start = time.time()
    work = Path(a.work).resolve()
    logs = work / "logs"
    py = a.project_python
    env_threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    os.environ.update(env_threads)

    llmc_v = ensure_llmc_venv(Path(a.llmc_venv), logs)
    pv = subprocess.run([py, "-c", "import json, torch, transformers; print(json.dumps({'torch': torch.__version__,"
                         " 'transformers': transformers.__version__}))"], capture_output=True, text=True, check=True)
    versions = {"llmc": llmc_v, "project": json.loads(pv.stdout), "project_git": git_state(),
                "threads": env_threads["OMP_NUM_THREADS"]}
    cmd = ".venv/bin/python benchmarks/peer/run.py" + "".join(
        f" {k} {shlex.quote(v)}" for k, v, d in (("--fixtures", a.fixtures, DEFAULT_FIXTURES),
                                                  ("--settings", a.settings, ",".join(SETTINGS)),
                                                  ("--calib-seeds", seeds_text(seeds), DEFAULT_SEEDS),
                                                  ("--vllm-qe-params", a.vllm_qe_params, "{}"),
                                                  ("--vllm-qe-args", a.vllm_qe_args, ""),
                                                  ("--num-calib", str(a.num_calib), "32"),
                                                  ("--num-eval", str(a.num_eval), "48")) if v != d)
    fixture_info: dict[str, dict] = {}
    for fx in fixtures:
        fdir = work / "fixtures" / fx
        log(f"fixture {fx}")
        sh([py, str(HERE / "fixtures.py"), fx, str(fdir)], logs / f"fixture-{fx}.log")
        fixture_info[fx] = {"desc": fixture_description(json.loads((fdir / "fixture.json").read_text()))}
    sm = {"cmd": cmd, "fixtures": fixture_info, "versions": versions, "params": a.vllm_qe_params,
          "started": started, "seeds": seeds, "steps_done": 0, "steps_planned": len(seeds) * len(fixtures),
          "elapsed_min": None, "results": {fx: {} for fx in fixtures}}
    tag = hashlib.sha256((a.vllm_qe_params + a.vllm_qe_args).encode()).hexdigest()[:8]
    # Seeds outermost: if the run is cut short, every row has the same (fewer) seeds and summary.json / the doc
    # hold everything finished so far (`--doc-only` rewrites the doc from it).
    for seed in seeds:
        for fx in fixtures:
            fdir, fwork = work / "fixtures" / fx, work / fx
            calib = fwork / f"calib-builtin-vqa-n{a.num_calib}-seed{seed}.safetensors"
            eval_chats = fwork / f"eval-test-seed7-n{a.num_eval}.safetensors"
            ckpts, per_setting = [], {}
            for st in settings:
                bits, gs, sym, _ = SETTINGS[st]
                ignore, expected = layer_plan(fdir, gs)
                qdir = fwork / "vllm-qe" / f"{st}-{tag}-seed{seed}"
                log(f"seed {seed} {fx} {st}: vllm-qe GPTQ ({len(expected)} layers)")
                vq = run_vllm_qe(py, fdir, qdir, st, a.vllm_qe_params, ignore, calib, a.num_calib, seed, logs / fx,
                                 a.reuse_vllm_qe, a.vllm_qe_args)
                from_dump = vq["identity"].get("sha256_reference")
                if not from_dump:
                    raise RuntimeError(f"{fx} {st} seed {seed}: vllm-qe's calibration chats were not captured: "
                                       f"{vq['identity']}")
                ldir = fwork / "llmc" / f"{st}-seed{seed}"
                log(f"seed {seed} {fx} {st}: llm-compressor GPTQ")
                lc = run_llmc(Path(a.llmc_venv), fdir, ldir, st, ignore, calib, from_dump, logs / fx, a.rerun_llmc,
                              seed)
                per_setting[st] = {"vllm_qe": vq, "llmc": lc, "ignore": ignore, "expected": expected,
                                   "calib_sha256": from_dump, "vllm_qe_dir": str(qdir), "llmc_dir": str(ldir)}
                ckpts += [qdir, ldir]
            log(f"seed {seed} {fx}: evaluating {len(ckpts)} checkpoints on {a.num_eval} held-out chats")
            eval_json = fwork / f"eval-seed{seed}.json"
            eval_json.unlink(missing_ok=True)
            sh([py, str(HERE / "evaluate.py"), str(fdir), str(eval_chats), str(eval_json), "--num-eval",
                str(a.num_eval), "--calib-chats", str(calib)] + [str(c) for c in ckpts],
               logs / fx / f"evaluate-seed{seed}.log")
            ev = json.loads(eval_json.read_text())
            for st in settings:
                ps = per_setting[st]
                e_q, e_l = ev[ps["vllm_qe_dir"]], ev[ps["llmc_dir"]]
                sm["results"][fx].setdefault(st, {})[str(seed)] = {
                    "vllm_qe": {k: e_q[k] for k in CHAT_KEYS},
                    "llmc": {k: e_l[k] for k in CHAT_KEYS},
                    "n_layers": len(e_q["modules"]), "calib_sha256": ps["calib_sha256"],
                    "bpw_vllm_qe": e_q["bpw"], "bpw_llmc": e_l["bpw"], "bpw16_llmc": e_l["bpw_16bit_floats"],
                    "t_vllm_qe": ps["vllm_qe"]["span_seconds"], "t_llmc": ps["llmc"]["seconds"]["span"],
                    "checks": row_checks(ps, e_q, e_l, versions["project_git"]),
                    "process_seconds": {"vllm_qe": ps["vllm_qe"]["process_seconds"],
                                        "llmc": ps["llmc"].get("process_seconds")}}
            (fwork / f"results-seed{seed}.json").write_text(json.dumps(
                {"rows": sm["results"][fx], "settings": per_setting}, indent=1, default=str))
            sm["steps_done"] += 1
            sm["elapsed_min"] = round((time.time() - t_start) / 60, 1)
            (work / "summary.json").write_text(json.dumps(sm, indent=1, default=str))
            write_doc(Path(a.doc), sm)
            log(f"seed {seed} {fx}: done ({sm['steps_done']} of {sm['steps_planned']} steps, "
                f"{sm['elapsed_min']} min); {a.doc} rewritten")
    print(write_doc(Path(a.doc), sm))
    return 0


def row_checks(ps: dict, e_q: dict, e_l: dict, code: str) -> str:
    """The per-(fixture, setting, seed) consistency checks, as one line for the doc."""
    mods_q = sorted(map(canonical, e_q["modules"]))
    mods_l = sorted(map(canonical, e_l["modules"]))
    mods_l_mem = sorted(map(canonical, ps["llmc"]["quantized_modules"]))
    ident = ps["vllm_qe"]["identity"]
    checks = [f"layers {'identical' if mods_q == mods_l == ps['expected'] == mods_l_mem else 'DIFFER'}"
              f" ({len(mods_q)} vllm-qe, {len(mods_l)} llm-compressor, {len(ps['expected'])} planned)",
              f"vllm-qe chats = dump: {ident.get('verified')} ({ident.get('calls')} forward calls, "
              f"{ident.get('distinct')} distinct)",
              "llm-compressor chats = dump: "
              f"{ps['llmc']['samples']['sha256'] == ps['calib_sha256']} "
              f"({len(ps['llmc']['samples']['indices_fed'])} chats fed, sha256 {ps['calib_sha256'][:12]})"]
    if e_q.get("fakequant_max_abs_logprob_diff") is not None:
        checks.append(f"substituted vs project fake-quant loader: max |Δ log p| "
                      f"{e_q['fakequant_max_abs_logprob_diff']:.1e}")
    if e_l.get("fp_logits_other_venv_max_abs_diff") is not None:
        checks.append(f"FP logits, llm-compressor venv vs project venv: max |Δ| "
                      f"{e_l['fp_logits_other_venv_max_abs_diff']:.1e}")
    if e_l.get("reader_vs_llmc_in_memory_max_abs_diff") is not None:
        checks.append(f"our compressed-tensors reader vs llm-compressor's in-memory weights: max |Δ| "
                      f"{e_l['reader_vs_llmc_in_memory_max_abs_diff']:.1e}")
    if ps["llmc"].get("cached"):
        checks.append("llm-compressor checkpoint and timing reused from an earlier run")
    if ps["vllm_qe"].get("code") and ps["vllm_qe"]["code"] != code:
        checks.append(f"vllm-qe code at this row: {ps['vllm_qe']['code']}")
    if ps["vllm_qe"].get("cached"):
        checks.append("vllm-qe checkpoint and timing reused from an earlier run (--reuse-vllm-qe)")
    return "; ".join(checks)


if __name__ == "__main__":
    sys.exit(main())

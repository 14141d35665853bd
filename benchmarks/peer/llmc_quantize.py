"""llm-compressor side of the peer benchmark (runs in the llm-compressor venv, never the project's).

`python llmc_quantize.py MODEL_DIR SAMPLES.safetensors OUT --wbits 4 --group-size 128 [--symmetric]
--ignore JSON_LIST` runs `oneshot` with a `GPTQModifier` whose GPTQ arguments are llm-compressor's defaults
(actorder static, dampening_frac 0.01, block_size 128, min-max observer), on exactly the tensors in
SAMPLES (a DataLoader over the dump: llm-compressor's own dataset preprocessing is bypassed), saves the
compressed-tensors checkpoint (pack-quantized) to OUT and writes OUT/peer_run.json: wall-clock spans, versions,
the quantized module names and the sha256 of the tensors the DataLoader handed over.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from chats import chats_digest, load_chats  # torch + safetensors only: importable in this venv
from safetensors.torch import save_file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("samples")
    p.add_argument("out")
    p.add_argument("--wbits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--ignore", default="[]", help="JSON list of module names / re: patterns left unquantized")
    p.add_argument("--gptq-args", default="{}", help="JSON: extra GPTQModifier arguments (default: none)")
    a = p.parse_args()

    t_proc = time.time()
    import compressed_tensors
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from torch.utils.data import DataLoader
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    torch.manual_seed(0)
    t0 = time.time()
    chats = load_chats(a.samples)
    fed: list[int] = []

    class Chats(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(chats)

        def __getitem__(self, i: int) -> int:
            fed.append(i)
            return i

    loader = DataLoader(Chats(), batch_size=1, shuffle=False, collate_fn=lambda b: dict(chats[b[0]]))
    model, info = AutoModelForImageTextToText.from_pretrained(a.model_dir, dtype=torch.float32,
                                                              output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
           and not all("lm_head" in str(x) for x in v)}
    if bad:
        raise SystemExit(f"{a.model_dir}: transformers {transformers.__version__} does not load it cleanly: {bad}")
    model.eval()
    with torch.no_grad():  # the FP model as this venv's transformers computes it (checked against the project's)
        fp_logits0 = model(**chats[0]).logits[0].float().contiguous()
    layer_cls = type(model.model.language_model.layers[0]).__name__
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=a.wbits, type="int", symmetric=a.symmetric, strategy="group", group_size=a.group_size))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=json.loads(a.ignore),
                          **json.loads(a.gptq_args))
    t1 = time.time()
    # The chats are pre-built tensors, so the processor is never used to preprocess; the tokenizer stands in for
    # it (the full Qwen2-VL processor needs torchvision, which this venv does not install).
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    oneshot(model=model, processor=tok, recipe=recipe, dataset=loader, num_calibration_samples=len(chats),
            shuffle_calibration_samples=False, sequential_targets=[layer_cls])
    t2 = time.time()
    quantized = sorted(n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None)
    # After GPTQ each quantized module's `weight` holds its quantize-dequantized values: kept so the evaluator can
    # check its own reader of the packed files against them.
    dense = {n: model.get_submodule(n).weight.detach().float().contiguous().clone() for n in quantized}
    model.save_pretrained(a.out, save_compressed=True)
    t3 = time.time()
    seen = sorted(set(fed))
    report = {
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "recipe": {"gptq": {k: str(v) for k, v in recipe.model_dump().items()
                            if k in ("actorder", "dampening_frac", "block_size", "ignore")},
                   "weights": scheme.weights.model_dump(mode="json"), "sequential_targets": [layer_cls]},
        "seconds": {"load": round(t1 - t0, 3), "oneshot": round(t2 - t1, 3), "save": round(t3 - t2, 3),
                    "span": round(t3 - t0, 3), "imports": round(t0 - t_proc, 3)},
        "quantized_modules": quantized,
        "samples": {"n": len(chats), "indices_fed": seen, "sha256": chats_digest([chats[i] for i in seen])},
    }
    (Path(a.out) / "peer_run.json").write_text(json.dumps(report, indent=1))
    save_file({"logits": fp_logits0}, str(Path(a.out) / "peer_fp_logits_chat0.safetensors"))
    save_file(dense, str(Path(a.out) / "peer_dense_weights.safetensors"))
    print(json.dumps(report["seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

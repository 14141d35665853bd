"""vllm-qe side of the peer benchmark (project venv): the `vllm-qe calibrate` CLI, run in this process with a
forward pre-hook on the model it loads, so the calibration chats the project really feeds its model are seen.

`python project_calibrate.py --chats CALIB.safetensors --report R.json -- MODEL --out OUT --method gptq ...`
(everything after `--` is passed to `vllm-qe calibrate` unchanged). If CALIB does not exist, the chats seen are
written there (the one calibration set both tools get); if it exists, every chat the project fed its model is
compared with it tensor for tensor (dtype, shape, bytes). R.json records the wall time of the CLI call and the
identity check. Nothing of the project is patched but `PreTrainedModel.from_pretrained`, to attach the hook.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chats import chats_digest, load_chats, save_chats  # noqa: E402


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(a[k], b[k]) for k in a)


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: project_calibrate.py --chats F --report R -- <vllm-qe calibrate arguments>")
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chats", required=True)
    p.add_argument("--report", required=True)
    a = p.parse_args(argv[:cut])
    cli_args = argv[cut + 1:]

    from importlib.metadata import entry_points

    import transformers

    # the `vllm-qe` console script's own function, wherever the project keeps it
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "vllm-qe"]
    cli_main = ep.load()

    calls: list[dict[str, torch.Tensor]] = []

    def record(mod, args, kwargs):
        if args:
            raise RuntimeError("the model was called with positional arguments; this wrapper expects kwargs")
        calls.append({k: v for k, v in kwargs.items() if torch.is_tensor(v)})

    original = transformers.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    transformers.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    t0 = time.time()
    rc = cli_main(["calibrate", *cli_args])
    wall = time.time() - t0
    transformers.PreTrainedModel.from_pretrained = classmethod(original)

    chats_path = Path(a.chats)
    identity: dict = {"calls": len(calls)}
    if not calls:
        identity["verified"] = False
        identity["why"] = "the project never called its model's forward (no chats seen)"
    else:
        distinct: list[dict[str, torch.Tensor]] = []
        for c in calls:  # the driver runs every chat once per chain, in order
            if not any(_same(c, d) for d in distinct):
                distinct.append(c)
        if not chats_path.is_file():
            save_chats(chats_path, distinct, meta={"source": "vllm-qe calibrate " + " ".join(cli_args)})
            identity["wrote"] = str(chats_path)
        ref = load_chats(chats_path)
        identity.update(distinct=len(distinct), reference=len(ref),
                        verified=len(distinct) == len(ref) and all(_same(x, y) for x, y in zip(distinct, ref))
                        and all(any(_same(c, r) for r in ref) for c in calls),
                        sha256_seen=chats_digest(distinct), sha256_reference=chats_digest(ref))
    Path(a.report).write_text(json.dumps({"rc": rc, "wall_seconds": round(wall, 3), "cli_args": cli_args,
                                          "identity": identity}, indent=1))
    print(f"project calibrate: {wall:.1f} s; chats identical to {chats_path.name}: {identity['verified']}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

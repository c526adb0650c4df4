"""Which parameters a 3-bit student should train, and at what learning rate: held-out KL
after 15 logit-distillation steps (batch 2, scored every 5) on SmolLM2-135M-Instruct after
GPTQ 3-bit group 64, per setting. The held-out windows are the distill step's own (8 windows
of the validation text, disjoint from the 128x512 calibration windows it trains on); the
test split is not read. Results in ``benchmarks/results/distill_tune.json``.

    python benchmarks/distill_tune.py
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import llmc
from llmc.calibration import CalibrationConfig
from llmc.models import load_model

OUT = Path(__file__).parent / "results" / "distill_tune.json"
SETTINGS = {
    "scales lr1e-4": {"trainable": "scales", "lr": 1e-4},
    "scales lr1e-3": {"trainable": "scales", "lr": 1e-3},
    "weights lr2e-4": {"trainable": "weights", "lr": 2e-4},
}


def main() -> None:
    model, tok = load_model("smollm2-135m")
    teacher = copy.deepcopy(model)
    calib = CalibrationConfig(samples=128, seqlen=512, seed=0)
    w3 = {"method": "gptq", "args": {"bits": 3, "group_size": 64}}
    student, _ = llmc.compress(model, {"steps": [w3]}, tokenizer=tok, calibration=calib,
                               progress=False)
    results = {"protocol": __doc__.split("\n\n")[0].replace("\n", " "), "settings": {}}
    for name, setting in SETTINGS.items():
        args = {"mode": "logit", "steps": 15, "batch_size": 2, "eval_every": 5, "heldout": 8,
                **setting}
        t = time.perf_counter()
        _, rep = llmc.distill(copy.deepcopy(student), teacher,
                              {"steps": [{"method": "distill", "args": args}]},
                              tokenizer=tok, calibration=calib, progress=False)
        d = rep.distill[0]
        results["settings"][name] = {
            "args": args, "heldout_kl": [h["heldout_kl"] for h in d["history"]],
            "best_step": d["best_step"], "seconds": time.perf_counter() - t,
        }
        print(name, [round(k, 4) for k in results["settings"][name]["heldout_kl"]], flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""`qlora estimate` against the measured peak resident memory (metrics.jsonl's peak_rss_bytes, VmHWM) of the bundled
configs: QLoRA on the tiny model, and the full-parameter pretraining config (on a generated text dataset, as its own
data is built by scripts/make_tiny_model.sh). Goal of issue 6: within 10 %. The runs are shortened (max_steps); their
activation and optimizer memory is that of every later step."""

import json
import os
import re
import subprocess

import pytest

from conftest import REPO


def estimated(qlora_bin, config, overrides):
    r = subprocess.run([qlora_bin, "estimate", config, *overrides], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = re.search(r"([0-9.]+) MiB  total", r.stdout)
    assert m, r.stdout
    return float(m.group(1)) * 2**20


def measured(qlora_bin, config, overrides):
    r = subprocess.run([qlora_bin, "train", config, *overrides], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    out = [o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")][0]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return max(json.loads(line).get("peak_rss_bytes", 0) for line in f)


def test_qlora_tiny_estimate_within_10_percent(qlora_bin, tmp_path):
    config = os.path.join(REPO, "configs", "tiny", "qlora.yaml")
    overrides = [f"output_dir={tmp_path / 'out'}", "max_steps=12", "eval_steps=0", "save_steps=0"]
    est, peak = estimated(qlora_bin, config, overrides), measured(qlora_bin, config, overrides)
    assert abs(est - peak) <= 0.10 * peak, (est / 2**20, peak / 2**20)


def test_full_training_estimate_within_10_percent(qlora_bin, tmp_path):
    verses = [json.loads(line) for line in open(os.path.join(REPO, "data", "tiny-kjv", "verses.jsonl"))]
    with open(tmp_path / "text.jsonl", "w") as f:
        for i in range(0, len(verses) - 4, 4):
            f.write(json.dumps({"text": " ".join(v["input"] + " " + v["output"] for v in verses[i:i + 4])}) + "\n")
    model = os.path.join(REPO, "models", "tiny-kjv")
    config = os.path.join(REPO, "configs", "tiny", "pretrain.yaml")
    overrides = [f"base_model={model}", f"tokenizer={model}/tokenizer.model", f"datasets.0.path={tmp_path / 'text.jsonl'}",
                 f"output_dir={tmp_path / 'out'}", "max_steps=3", "eval_steps=0", "save_steps=0",
                 "resume_from_checkpoint=null"]
    est, peak = estimated(qlora_bin, config, overrides), measured(qlora_bin, config, overrides)
    assert abs(est - peak) <= 0.10 * peak, (est / 2**20, peak / 2**20)

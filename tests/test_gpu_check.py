"""bench/gpu_check.py cannot rot between GPU loans: its --smoke mode runs every section on the CPU (tiny
shapes, eager), and without CUDA its normal mode reports every section as skipped, saying why."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("training", "speedrun", "compiled_run", "decoding", "hellaswag", "notebook", "presets")
FIGURES = ("tokens_per_s", "examples_per_s")


def run_check(out_dir: Path, *args: str) -> tuple[dict, str]:
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out_dir), *args],
                            capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu_check: every check passed or was skipped" in result.stdout
    return json.loads((out_dir / "gpu_check.json").read_text()), (out_dir / "gpu_check.md").read_text()


@pytest.mark.registry
def test_smoke_mode_runs_every_section_on_the_cpu(tmp_path):
    payload, report = run_check(tmp_path, "--smoke", "--budget-s", "100000")  # never time-boxed here
    environment = payload["environment"]
    assert environment["torch"] == torch.__version__ and environment["date"].startswith("20")
    assert payload["mode"] == "smoke" and payload["failed"] == []
    for name in SECTIONS:
        section = payload["sections"][name]
        assert "error" not in section and "skipped" not in section and section.get("ok", True), (name, section)
        for row in section["rows"]:  # every row has figures or says why it has none
            assert row.get("skipped") or any(row.get(key, 0) > 0 for key in FIGURES), (name, row)
        assert f"### {name}" in report
    training = payload["sections"]["training"]["rows"]
    measured = {(r["library"], r["precision"]) for r in training if r["mode"] == "eager" and "tokens_per_s" in r}
    assert measured == {(library, precision) for library in ("nbgpt", "transformers")
                        for precision in ("bf16", "fp16", "fp32")}
    assert all(r["finite"] for r in training if "tokens_per_s" in r)
    assert all(r["skipped"].startswith("--smoke runs eager only") for r in training if r["mode"] == "compiled")
    run = payload["sections"]["compiled_run"]["rows"][0]
    assert run["evals"] >= 2 and run["hellaswag_runs"] >= 2 and run["samples"] >= 2
    assert payload["sections"]["notebook"]["rows"][0]["steps"] == 2
    speedrun = payload["sections"]["speedrun"]["rows"][0]  # the figure bench/t4_plan.py reads on a T4
    assert speedrun["recipe"] == "speedrun" and speedrun["accumulation"] == 8 and speedrun["finite"]


@pytest.mark.registry
def test_a_killed_check_keeps_the_report_of_every_finished_section(tmp_path):
    """A time limit that kills the check mid-way loses no figure: the report is rewritten after every section,
    the finished ones in it, the others saying they were not reached."""
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--budget-s",
                                "100000", "--out", str(tmp_path)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    path = tmp_path / "gpu_check.json"

    def first_section_done() -> bool:
        sections = json.loads(path.read_text())["sections"] if path.is_file() else {}
        return bool(sections) and "rows" in next(iter(sections.values()))

    try:
        deadline = time.time() + 900
        while time.time() < deadline and process.poll() is None and not first_section_done():
            time.sleep(0.05)
    finally:
        process.kill()  # as a time limit would, while the next section runs
        process.wait()
    payload = json.loads(path.read_text())
    names = list(payload["sections"])
    assert set(names) == set(SECTIONS)
    first = payload["sections"][names[0]]
    assert first["rows"] and first["ok"] and first["section_s"] > 0
    for name in names[2:]:  # the second section was running when the kill came
        assert payload["sections"][name]["skipped"].startswith("not reached: the check stopped"), name
    report = (tmp_path / "gpu_check.md").read_text()
    assert f"### {names[0]}\n\n| " in report and f"### {names[-1]}\n\nskipped: not reached" in report


def test_without_cuda_every_section_says_why(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `make gpu-check` measures instead")
    payload, report = run_check(tmp_path)
    assert payload["mode"] == "cpu" and set(payload["sections"]) == set(SECTIONS)
    for section in payload["sections"].values():
        assert section["skipped"].startswith("no CUDA device: run `make gpu-check` on a GPU machine")
    assert report.count("skipped: no CUDA device") == len(SECTIONS)

"""bench/benchmark.py --quick runs end to end on CPU and reports both tables (no timing checks); its FLOP
count matches torch's; bench/gpu_check.sh --dry-run writes its JSON."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import ROOT
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

TRAIN_HEADER = ("## Training throughput", "model", "params (non-embedding, M)", "batch x length",
                "tokens/s", "ms/step", "peak RSS")
SAMPLE_HEADER = ("## Sampling", "predictor", "steps", "NFE", "s/sample", "speed-up vs ddpm")
MFU_COLUMNS = ("matmul peak (measured)", "output rows / token", "GFLOP/step", "TFLOP/s", "MFU (vs measured peak)",
               "data / step")


def test_quick_benchmark_writes_both_tables(tmp_path: Path) -> None:
    out = tmp_path / "b.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "bench/benchmark.py", "--quick", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    for text in (proc.stdout, out.read_text()):
        for column in (*TRAIN_HEADER, *SAMPLE_HEADER, *MFU_COLUMNS, "flash-attn", "torch"):
            assert column in text
        assert "| micro |" in text  # the one training row
        rows = [line for line in text.splitlines() if line.startswith("| ddpm")]
        assert len(rows) == 4  # (ddpm, ddpm_cache) x steps (4, 8)


def test_quick_benchmark_has_a_dimamba_row(tmp_path: Path) -> None:
    out = tmp_path / "b.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "bench/benchmark.py", "--quick", "--device", "cpu", "--train-sizes", "tiny-dimamba",
           "--vocab", "512", "--steps", "4", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "| tiny-dimamba | 28.4 |" in text  # non-embedding parameters, as DiT tiny's 28.5M
    assert "mamba-ssm" in text


def test_block_diffusion_benchmark_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "bd3lm.md"
    cmd = [sys.executable, "bench/block_diffusion_benchmark.py", "--length", "32", "--vocab", "64", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith(("| BD3-LM", "| MDLM"))]
    assert [(r[0], r[1]) for r in rows] == [("| BD3-LM L'=4", "yes"), ("| BD3-LM L'=4", "no"),
                                            ("| BD3-LM L'=16", "yes"), ("| BD3-LM L'=16", "no"), ("| MDLM", "-")]
    nfe = [int(r[2].replace(",", "")) for r in rows]
    assert nfe == [32 + 7, 32, 32 + 1, 32, 32]  # first-hitting: one call per token, plus the cache fills


# --------------------------------------------------------------------------- FLOPs, peak, gpu_check.sh


@functools.cache
def load_benchmark() -> ModuleType:
    """bench/benchmark.py as a module (bench/ is not a package), loaded once."""
    spec = importlib.util.spec_from_file_location("bench_benchmark", ROOT / "bench" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def small_backbone(kind: str, vocab: int) -> torch.nn.Module:
    from models.dimamba import DiMamba
    from models.dit import DiT

    if kind == "dit":
        return DiT(vocab_size=vocab, hidden_size=64, cond_dim=32, n_blocks=2, n_heads=4, dropout=0.0)
    return DiMamba(vocab_size=vocab, hidden_size=64, cond_dim=32, n_blocks=2, dropout=0.0)


@pytest.mark.parametrize("kind", ["dit", "dimamba"])
def test_step_flops_match_torch_flop_counter(kind: str) -> None:
    """The analytic count of bench/benchmark.py equals the matmul FLOPs torch counts in one MDLM training step.

    DiT: all FLOPs torch counts (SDPA's math path runs the attention as bmm, so it is counted too).
    DiMamba: the mm / addmm FLOPs (torch also counts the scan's einsum and the depthwise
    convolution, which the formula leaves out as not matmuls).
    """
    bench = load_benchmark()
    vocab, batch, length = 500, 4, 32
    torch.manual_seed(0)
    model = small_backbone(kind, vocab).train()
    algorithm = bench.build_algorithm(bench.framework_defaults(), mask_index=vocab - 1)
    x0 = torch.randint(0, vocab - 1, (batch, length))  # (B, L)
    with (bench.count_forward_rows(model) as counts, FlopCounterMode(display=False) as counter,
          sdpa_kernel(SDPBackend.MATH)):
        algorithm.loss(model, x0, torch.ones_like(x0)).nll.mean().backward()

    assert (counts["sequences"], counts["length"]) == (batch, length)
    if kind == "dit":  # the output layer runs at the masked positions only
        assert 0 < counts["output_rows"] < batch * length
        expected = counter.get_total_flops()
    else:
        assert counts["output_rows"] == batch * length
        per_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
        expected = per_op["aten.mm"] + per_op.get("aten.addmm", 0)
    flops = bench.step_flops(bench.flop_model(model), counts["sequences"], counts["length"], counts["output_rows"])
    # Not exact: the first Linear of the noise embedding has no input gradient (4 FLOPs per weight, not 6).
    assert flops == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA RTX A5000", 111.1), ("Tesla T4", None),
])
def test_nominal_bf16_peak_by_device_name(name: str, tflops: float | None) -> None:
    assert load_benchmark().nominal_bf16_tflops(name) == tflops


def test_matmul_peak_is_a_rate() -> None:
    rate = load_benchmark().measure_matmul_peak(torch.device("cpu"), 64, torch.float32)
    assert 1e6 < rate < 1e15  # FLOP/s of a 64^3 fp32 product on any CPU


TRAIN_ROW_KEYS = {"size", "params", "batch", "length", "tokens_per_s", "ms_per_step", "peak_mib",
                  "output_rows_per_token", "flops_per_step", "tflops", "mfu", "mfu_nominal", "data_to_step"}
SAMPLE_ROW_KEYS = {"predictor", "steps", "nfe", "s_per_sample", "size", "length", "batch"}


def run_gpu_check(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)


def test_gpu_check_dry_run_writes_one_json(tmp_path: Path) -> None:
    """bench/gpu_check.sh --dry-run: the GPU sequence on CPU at toy sizes, every field the docs table needs."""
    out = tmp_path / "gpu_check.json"
    proc = run_gpu_check(["--dry-run", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # one file, the work folder removed
    report = json.loads(out.read_text())

    assert {"dry_run", "date", "seconds", "gpu", "torch", "cuda", "tests", "benchmark", "matmul_peak", "data",
            "training", "sampling"} <= set(report)
    assert report["dry_run"] is True and report["gpu"] is None and report["torch"] == torch.__version__
    tests = report["tests"]
    assert tests["exit_code"] == 0 and tests["failed"] == tests["errors"] == 0
    assert tests["total"] >= 1 and tests["passed"] + tests["skipped"] == tests["total"]  # the gpu tests skip here
    assert report["benchmark"]["exit_code"] == 0 and report["benchmark"]["precision"] == "fp32"
    assert report["matmul_peak"]["dtype"] == "float32" and report["matmul_peak"]["tflops"] > 0
    assert report["data"]["ms_per_batch"] > 0

    [row] = report["training"]
    assert set(row) >= TRAIN_ROW_KEYS and row["size"] == "micro"
    assert row["tflops"] == pytest.approx(row["flops_per_step"] / (row["ms_per_step"] / 1000) / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops"] / report["matmul_peak"]["tflops"])
    assert row["mfu_nominal"] is None  # no GPU, no data-sheet peak
    assert 0 < row["output_rows_per_token"] <= 1
    assert [(r["predictor"], r["steps"]) for r in report["sampling"]] == [("ddpm", 8), ("ddpm_cache", 8)]
    assert all(set(r) >= SAMPLE_ROW_KEYS for r in report["sampling"])


def test_gpu_check_reports_failed_stages(tmp_path: Path) -> None:
    """A failing stage still gives the JSON, with its exit code, and the script exits non-zero."""
    out = tmp_path / "gpu_check.json"
    proc = run_gpu_check(["--dry-run", "--out", str(out), "--no-such-pytest-option"],
                         env={"GPU_CHECK_BENCH_TIMEOUT": "1"})
    assert proc.returncode != 0
    report = json.loads(out.read_text())
    assert report["tests"]["exit_code"] != 0 and report["tests"]["total"] is None  # pytest refused the option
    assert report["benchmark"]["timed_out"] is True and report["training"] == [] and report["sampling"] == []

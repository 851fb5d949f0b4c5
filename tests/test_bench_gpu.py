"""`python -m pipeline bench gpu` and `bench features --real-size` on the CPU (tiny step counts:
about 40 s and 15 s on 2 busy cores); their GPU sides need CUDA and are not run here."""

from dataclasses import replace

import pytest
import torch

from pipeline.bench.features import bench_features_real_size
from pipeline.bench.gpu import NO_CUDA, Checks, budgets, format_row, row
from tests.conftest import run_cli

CHECKS = (
    "train R3D-18: fp32",
    "train R3D-18: bf16 autocast",
    "train R3D-18: fp16 autocast + GradScaler",
    "train R3D-18: channels-last 3D (fp32)",
    "copy a uint8 batch to the GPU: pinned, non_blocking",
    "feature cache build: ResNet-50 teacher, 224 px",
    "JPEG shard decode, 128x170: CPU vs nvJPEG",
    "train R3D-18: DDP, 1 process (gloo / NCCL)",
    "DTG-Net pre-training: R3D-18 student",
)
NOT_RUN_ON_CPU = {"train R3D-18: fp16 autocast + GradScaler", "copy a uint8 batch"}
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only output")


@needs_no_cuda
def test_bench_gpu_runs_the_cpu_side_and_says_what_it_skipped(tmp_path):
    result = run_cli(
        "bench", "gpu", "--steps", "1", "--cpu-steps", "1", "--threads", "2", cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for check in CHECKS:
        [line] = [line for line in lines if line.strip().startswith(check)]
        assert NO_CUDA in line
        cpu = line.strip().removeprefix(check).split()
        if check.startswith(tuple(NOT_RUN_ON_CPU)):
            assert cpu[0] in ("not", "-")
        else:
            assert float(cpu[0].replace(",", "")) > 0 and cpu[1].endswith("/s")
    assert list(tmp_path.iterdir()) == []  # temporary shards and feat files are gone


def test_a_failing_gpu_measurement_is_reported_and_the_next_one_runs():
    cpu = budgets(1, 1)["cpu"]
    checks = Checks({"cpu": cpu, "cuda": replace(cpu, clips=99)})

    def measure(budget):
        if budget.clips == 99:
            raise RuntimeError("nvJPEG is missing\nsecond line")
        return 2.0

    figures = checks.both(measure)
    assert figures == {
        "cpu": 2.0,
        "cuda": "failed",
        "error": "GPU failed: RuntimeError: nvJPEG is missing",
    }
    assert checks.failures == ["RuntimeError: nvJPEG is missing"]
    line = format_row(row("some check", "clips/s", figures, "a note"))
    assert "2.00 clips/s" in line and "failed" in line
    assert line.endswith("GPU failed: RuntimeError: nvJPEG is missing; a note")
    assert checks.both(lambda budget: 3.0) == {"cpu": 3.0, "cuda": 3.0}


@needs_no_cuda
def test_bench_features_real_size_on_the_cpu(capsys):
    threads_before = torch.get_num_threads()
    result = bench_features_real_size(steps=1, cpu_steps=1, threads=2, teachers=("imagenet",))
    assert torch.get_num_threads() == threads_before
    assert result["cuda"] == NO_CUDA
    cpu = result["cpu"]
    assert len(cpu["cache_runs_clips_per_s"]) == 2 and min(cpu["cache_runs_clips_per_s"]) > 0
    assert cpu["online_clips_per_s"] > 0
    assert cpu["speedup"] == pytest.approx(cpu["cache_clips_per_s"] / cpu["online_clips_per_s"])
    printed = capsys.readouterr().out
    assert "teachers imagenet, each a ResNet-50 (random weights) at 224 px" in printed
    assert "guidance frames + teachers online" in printed and "cache speed-up" in printed
    assert f"GPU: {NO_CUDA}" in printed

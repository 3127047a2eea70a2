"""GPU checks (opt-in: pytest -m gpu on a CUDA machine): bf16 ZeRO-3 student + ZeRO-3 teacher through the launcher."""
import math

import pytest
import torch

from conftest import read_metrics, run_launcher

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("impl", ["fused", "plain"])
def test_bf16_zero3_distillation_learns(data_dir, teacher_dir, tmp_path, impl):
    run_launcher(data_dir, tmp_path, f"name={impl}", f"teacher={teacher_dir}", "alpha=0.4", f"loss_impl={impl}",
                 nproc=1, ds_config="ds_configs/zero3.json")
    m, evals = read_metrics(tmp_path / impl)
    assert all(math.isfinite(r["loss/total"]) for r in m.values())
    assert m[max(m)]["loss/ce"] < m[1]["loss/ce"] - 0.5
    assert 0 < m[max(m)]["perf/teacher_share"] < 1


@pytest.mark.parametrize("placement", ["offload", "replicated"])
def test_teacher_placements(data_dir, teacher_dir, tmp_path, placement):
    run_launcher(data_dir, tmp_path, f"name={placement}", f"teacher={teacher_dir}", "alpha=0.4",
                 f"teacher_placement={placement}", "max_steps=3", nproc=1, ds_config="ds_configs/zero3.json")
    m, _ = read_metrics(tmp_path / placement)
    assert sorted(m) == [1, 2, 3] and all(math.isfinite(r["loss/total"]) for r in m.values())
    head = (tmp_path / placement / "config.yaml").read_text().splitlines()[0]
    assert head.startswith(f"# teacher {placement} (set): ")

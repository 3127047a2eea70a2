"""scripts/scaling.py (docs/scaling.md's tables): sizes and bytes against a hand count."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import scaling  # noqa: E402


def test_bytes_and_memory_match_a_hand_count():
    # llama3-0.7b by hand: per layer q/o 2 x 1024 x 4096 + k/v 2 x 1024 x 1024 + MLP 3 x 1024 x 8192 + 2 norms of
    # 1024 = 35,653,632; x 12 layers + final norm 1024; + untied embedding and head 2 x 128256 x 1024
    p = 12 * (2 * 1024 * 4096 + 2 * 1024 * 1024 + 3 * 1024 * 8192 + 2 * 1024) + 1024 + 2 * 128256 * 1024
    assert p == 690_512_896
    r = scaling.per_micro_step("llama3-0.7b", "llama3-0.7b", 8, 2, 8192)
    assert r["student_params"] == r["teacher_params"] == p
    norms = 25 * 1024                                              # persistent (never gathered): ZeRO-3 thresholds
    # student (1e6, zero3.json): gather fwd + gather bwd (at most) + reduce-scatter of every gradient, bf16
    assert r["student_bytes"] == 2 * 2 * (p - norms) * 7 / 8 + 2 * p * 7 / 8
    assert r["student_bytes_min"] == 2 * (p - norms) * 7 / 8 + 2 * p * 7 / 8  # the backward re-gathers nothing
    assert r["teacher_bytes"] == 2 * (p - norms) * 7 / 8          # one forward gather (threshold 1e5)
    assert r["auto"] == "replicated"                               # 1.3 GiB next to the student on 80 GiB
    assert r["teacher_offload_pcie_bytes"] == 2 * p and r["tokens"] == 16384
    assert r["student_states_gib"] == pytest.approx(16 * p / 8 / 2 ** 30)
    t = scaling.times(r, peak_tflops=1000, mfu=0.5, intra_gbs=100, inter_gbs=10, pcie_gbs=20, gpus_per_node=8)
    assert t["compute_s"] == pytest.approx((r["student_flops"] + r["teacher_flops"]) / 5e14)
    assert t["student_comm_s"] == pytest.approx(r["student_bytes"] / 100e9)          # 8 GPUs: inside one node
    r64 = scaling.per_micro_step("llama3-0.7b", "llama3-0.7b", 64, 2, 8192)
    t64 = scaling.times(r64, 1000, 0.5, 100, 10, 20, 8)
    assert t64["student_comm_s"] == pytest.approx((6 * p - 4 * norms) * 63 / 64 / 10e9)   # across nodes

"""The latency benchmark's kernel classifier: the figures in benchmarks/RESULTS.md are summed by it."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.mark.parametrize("name,kind", [
    # Inductor names a kernel after the ops it fuses: one that adds a conv's bias says "convolution"
    ("triton_poi_fused__to_copy_add_addcmul_convolution_mean_mul_permute_rsqrt_silu_sub_view_8", "inductor pointwise"),
    ("triton_red_fused__to_copy_convolution_permute_silu_var_mean_view_6", "inductor reduction"),
    ("triton_per_fused_add_div_native_layer_norm_view_74", "inductor reduction"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("sm90_xmma_dgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x25", "convolution"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64", "attention"),
    ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "gemm"),
    ("Memset (Unknown)", "other"),
])
def test_kernels_are_counted_in_their_kind(name, kind):
    from fixer_latency import kernel_kind

    assert kernel_kind(name) == kind


def test_kernel_totals_sum_cuda_leaf_kernels_by_kind():
    import torch
    from fixer_latency import kernel_totals

    class Event:
        def __init__(self, key, us, cuda=True):
            self.key, self.self_device_time_total, self.count = key, us, 3
            self.device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU

    totals, top = kernel_totals([
        Event("triton_poi_fused_add_convolution_div_silu_233", 100.0),
        Event("triton_poi_fused_gelu_mul_split_view_75", 50.0),
        Event("sm90_xmma_fprop_implicit_gemm_bf16", 400.0),
        Event("aten::convolution", 400.0),  # the op that launched it: not counted twice
        Event("sm90_xmma_fprop_implicit_gemm_bf16", 7.0, cuda=False),  # a CPU-side row
    ])
    assert totals == {"inductor pointwise": 150.0, "convolution": 400.0}
    assert len(top["inductor pointwise"]) == 2


def test_idle_gaps_count_only_time_no_kernel_runs(tmp_path):
    """Overlapping kernels leave no gap; each gap is charged to the kernel pair around it; CPU events are ignored."""
    import json

    from fixer_latency import idle_gaps

    kernels = [(0, 10, "conv"), (12, 5, "norm"), (30, 10, "conv"), (41, 3, "gemm"), (43, 100, "attn"),
               (150, 1, "norm")]
    events = [{"ph": "X", "cat": "kernel", "ts": t, "dur": d, "name": n} for t, d, n in kernels]
    events.append({"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 500, "name": "aten::conv"})
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    text = idle_gaps(str(trace), forwards=1, batch=2)
    # gaps: conv->norm 2 us, norm->conv 13, conv->gemm 1, attn->norm 7 (gemm overlaps attn): 23 us over 2 frames
    assert "idle 0.011 ms/frame in 4 gaps per forward" in text  # 11.5 us
    lines = text.splitlines()
    pairs = lines[lines.index("idle us/frame  gaps/forward  after -> before") + 1:]
    assert pairs[0].split() == ["6.5", "1.0", "norm", "->", "conv"]
    assert pairs[1].split() == ["3.5", "1.0", "attn", "->", "norm"]


def test_conv_fusion_reports_cudnns_reasons_in_one_line():
    """A refused cuDNN graph is recorded with its distinct reasons, not cuDNN's whole multi-engine log."""
    from conv_fusion import refusal

    message = (
        "no engine proposed a plan (the backend declined: No valid engine configs for ____\n"
        '{"engineId":9,"smVersion":900}\n'
        "Warning: CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH; Reason: FORT_NATIVE_10X engine is only supported since "
        "Blackwell architecture\n"
        "Warning: CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH; Reason: initial_compatibility_check()\n"
        "Warning: CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE; Reason: !is_matching_input_datatype\n"
        "Warning: CUDNN_STATUS_NOT_SUPPORTED; Reason: ptr->isSupported()\n"
        '{"engineId":1,"smVersion":900}\n'
        "Warning: CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE; Reason: !is_matching_input_datatype\n")
    assert refusal(RuntimeError(message)) == (
        "FORT_NATIVE_10X engine is only supported since Blackwell architecture; !is_matching_input_datatype")
    assert refusal(RuntimeError("plain failure")) == "plain failure"

"""Compile fusedce's Triton kernels ahead of time for a Hopper GPU (sm_90), without a GPU.

Run as a script with TRITON_INTERPRET unset (tests/test_aot.py does): the interpreter accepts
code that the compiler rejects (types, constexpr use), and this catches that before a GPU does.
Prints one line per compiled variant; exits non-zero on the first failure.
"""

from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedce.kernels import cross_entropy_kernels as ce
from fusedce.kernels import distill_kernels as kd

TARGET = GPUTarget("cuda", 90, 32)
FLAGS = ["HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SCALE", "HAS_SOFTCAP", "RETURN_STATS",
         "HAS_ENTROPY"]


def _fwd_signature(dtype: str) -> dict[str, str]:
    pointers = {
        "logits_ptr": dtype, "target_ptr": "*i64", "weight_ptr": "*fp32",
        "weight_sum_ptr": "*fp32", "scale_ptr": "*fp32", "partial_ptr": "*fp32",
        "partial_idx_ptr": "*i32", "target_logit_ptr": "*fp32", "target_weight_ptr": "*fp32",
        "loss_ptr": "*fp32", "lse_ptr": "*fp32", "z_loss_ptr": "*fp32", "correct_ptr": "*fp32",
        "entropy_ptr": "*fp32", "argmax_ptr": "*i64", "stats_ptr": "*fp32",
        "lse_grad_ptr": "*fp32", "entropy_grad_ptr": "*fp32", "grad_ptr": dtype,
    }
    ints = {name: "i64" for name in ("stride_logits_row", "stride_grad_row",
                                     "stride_logits_group", "stride_grad_group")}
    ints.update({name: "i32" for name in ("stride_scale", "n_rows", "rows_per_group", "n_cols",
                                          "n_classes",
                                          "vocab_start", "cols_per_split", "n_partials",
                                          "ignore_index")})
    floats = {name: "fp32" for name in ("label_smoothing", "logit_scale", "softcap",
                                        "lse_square_scale")}
    return {**pointers, **ints, **floats}


def _compile(fn, signature: dict[str, str], constexprs: dict) -> None:
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET)


def main() -> int:
    variants = 0
    for dtype in ("*bf16", "*fp32", "*fp16"):
        # The forward kernel: every flag off, every flag on, and each single flag on, with and
        # without merged statistics and vocabulary parallelism.
        flag_sets = [dict.fromkeys(FLAGS, False), dict.fromkeys(FLAGS, True)]
        flag_sets += [{f: f == on for f in FLAGS} for on in FLAGS]
        # (MERGE, VOCAB_PARALLEL, COMPUTE_GRAD, HAS_ZLOSS, HAS_STAT_GRADS)
        modes = [(False, False, True, False, False), (True, False, True, True, False),
                 (True, True, True, True, False), (False, False, False, False, False),
                 (True, False, True, False, True), (False, False, True, True, True)]
        for flags, (merge, vp, grad, zloss, stat_grads) in itertools.product(flag_sets, modes):
            if dtype != "*bf16" and flags not in flag_sets[:2]:
                continue  # the flags' code is dtype-independent; cover it once
            constexprs = dict(flags, BLOCK_SIZE=1024, PARTIAL_BLOCK=4, MERGE=merge,
                              VOCAB_PARALLEL=vp, HAS_ZLOSS=zloss, STORE_STATS=not grad,
                              COMPUTE_GRAD=grad, HAS_STAT_GRADS=stat_grads)
            _compile(ce.ce_fwd_kernel, _fwd_signature(dtype), constexprs)
            variants += 1
        stats_sig = {"logits_ptr": dtype, "target_ptr": "*i64", "weight_ptr": "*fp32",
                     "partial_ptr": "*fp32", "partial_idx_ptr": "*i32",
                     "stride_logits_row": "i64", "stride_logits_group": "i64",
                     "n_rows": "i32", "rows_per_group": "i32", "n_cols": "i32",
                     "cols_per_split": "i32", "n_splits": "i32", "ignore_index": "i32",
                     "logit_scale": "fp32", "softcap": "fp32"}
        for on in (False, True):
            _compile(ce.ce_stats_kernel, stats_sig,
                     dict(dict.fromkeys(FLAGS, on), BLOCK_SIZE=2048))
            variants += 1
        bwd_sig = {"grad_ptr": dtype, "grad_output_ptr": "*fp32", "stride_grad_row": "i64",
                   "stride_grad_group": "i64", "stride_grad_output": "i32", "n_rows": "i32",
                   "rows_per_group": "i32", "n_cols": "i32"}
        _compile(ce.ce_bwd_kernel, bwd_sig, {"BLOCK_SIZE": 4096})
        variants += 1
        # The distillation kernel: each divergence, with and without the hard label, its own
        # log-sum-exp, the statistics and the gradient.
        kd_sig = {"student_ptr": dtype, "teacher_ptr": dtype, "target_ptr": "*i64",
                  "factor_ptr": "*fp32", "loss_ptr": "*fp32", "div_ptr": "*fp32",
                  "entropy_ptr": "*fp32", "agree_ptr": "*fp32", "grad_ptr": dtype,
                  "stride_student_row": "i64", "stride_teacher_row": "i64",
                  "stride_grad_row": "i64", "n_cols": "i32", "inv_t": "fp32", "beta": "fp32",
                  "log_beta": "fp32", "log_1m_beta": "fp32", "hard_weight": "fp32",
                  "ignore_index": "i32"}
        for divergence, on in itertools.product((0, 1, 2), (False, True)):
            _compile(kd.kd_fwd_kernel, kd_sig,
                     dict(BLOCK_SIZE=2048, DIVERGENCE=divergence, HAS_HARD=on, HARD_LSE=on,
                          STATS=on, COMPUTE_GRAD=True))
            variants += 1
        topk_sig = {"student_ptr": dtype, "ids_ptr": "*i64", "logprobs_ptr": "*fp32",
                    "target_ptr": "*i64", "factor_ptr": "*fp32", "loss_ptr": "*fp32",
                    "div_ptr": "*fp32", "entropy_ptr": "*fp32", "agree_ptr": "*fp32",
                    "grad_ptr": dtype, "stride_student_row": "i64", "stride_grad_row": "i64",
                    "n_cols": "i32", "k": "i32", "inv_t": "fp32", "beta": "fp32",
                    "log_beta": "fp32", "log_1m_beta": "fp32", "hard_weight": "fp32",
                    "ignore_index": "i32"}
        for divergence, renorm in itertools.product((0, 1, 2), (False, True)):
            _compile(kd.kd_topk_kernel, topk_sig,
                     dict(BLOCK_SIZE=2048, K_BLOCK=32, DIVERGENCE=divergence,
                          RENORMALIZE=renorm, HAS_HARD=not renorm, HARD_LSE=not renorm,
                          STATS=True, COMPUTE_GRAD=True))
            variants += 1
        # The split path's kernels (few rows: the vocabulary across programs).
        chunk = {"n_rows": "i32", "n_cols": "i32", "cols_per_split": "i32", "n_splits": "i32"}
        logs = {"inv_t": "fp32", "beta": "fp32", "log_beta": "fp32", "log_1m_beta": "fp32",
                "hard_weight": "fp32", "ignore_index": "i32"}
        for divergence, on in itertools.product((0, 1, 2), (False, True)):
            _compile(kd.kd_partial_kernel,
                     {"student_ptr": dtype, "teacher_ptr": dtype, "part_ptr": "*fp32",
                      "first_ptr": "*i32", "stride_student_row": "i64",
                      "stride_teacher_row": "i64", **chunk, "inv_t": "fp32"},
                     dict(BLOCK_SIZE=2048, DIVERGENCE=divergence, HARD_LSE=on, STATS=on))
            _compile(kd.kd_merge_kernel,
                     {"student_ptr": dtype, "part_ptr": "*fp32", "first_ptr": "*i32",
                      "target_ptr": "*i64", "row_ptr": "*fp32", "entropy_ptr": "*fp32",
                      "agree_ptr": "*fp32", "stride_student_row": "i64", "n_rows": "i32",
                      "n_cols": "i32", "n_splits": "i32", "ignore_index": "i32"},
                     dict(SPLIT_BLOCK=8, DIVERGENCE=divergence, HAS_HARD=on, HARD_LSE=on,
                          STATS=on))
            _compile(kd.kd_grad_kernel,
                     {"student_ptr": dtype, "teacher_ptr": dtype, "row_ptr": "*fp32",
                      "kl_q_ptr": "*fp32", "target_ptr": "*i64", "factor_ptr": "*fp32",
                      "grad_ptr": dtype, "stride_student_row": "i64",
                      "stride_teacher_row": "i64", "stride_grad_row": "i64", "n_rows": "i32",
                      "n_cols": "i32", "cols_per_split": "i32", **logs},
                     dict(BLOCK_SIZE=2048, DIVERGENCE=divergence, HAS_HARD=on))
            variants += 3
        _compile(kd.kd_jsd_partial_kernel,
                 {"student_ptr": dtype, "teacher_ptr": dtype, "row_ptr": "*fp32",
                  "part_ptr": "*fp32", "stride_student_row": "i64",
                  "stride_teacher_row": "i64", **chunk, "inv_t": "fp32", "log_beta": "fp32",
                  "log_1m_beta": "fp32"}, dict(BLOCK_SIZE=2048))
        variants += 1
        for divergence, renorm in itertools.product((0, 1, 2), (False, True)):
            on = not renorm
            _compile(kd.kd_topk_partial_kernel,
                     {"student_ptr": dtype, "ids_ptr": "*i64", "part_ptr": "*fp32",
                      "first_ptr": "*i32", "stride_student_row": "i64", **chunk, "k": "i32",
                      "inv_t": "fp32"},
                     dict(BLOCK_SIZE=2048, K_BLOCK=32, HARD_LSE=on, STATS=on))
            _compile(kd.kd_topk_merge_kernel,
                     {"student_ptr": dtype, "ids_ptr": "*i64", "logprobs_ptr": "*fp32",
                      "part_ptr": "*fp32", "first_ptr": "*i32", "target_ptr": "*i64",
                      "factor_ptr": "*fp32", "loss_ptr": "*fp32", "div_ptr": "*fp32",
                      "entropy_ptr": "*fp32", "agree_ptr": "*fp32", "coef_ptr": "*fp32",
                      "row_ptr": "*fp32", "stride_student_row": "i64", "n_rows": "i32",
                      "n_cols": "i32", "n_splits": "i32", "k": "i32", **logs},
                     dict(SPLIT_BLOCK=8, K_BLOCK=32, DIVERGENCE=divergence, RENORMALIZE=renorm,
                          HAS_HARD=on, HARD_LSE=on, STATS=True))
            _compile(kd.kd_topk_grad_kernel,
                     {"student_ptr": dtype, "ids_ptr": "*i64", "coef_ptr": "*fp32",
                      "row_ptr": "*fp32", "target_ptr": "*i64", "factor_ptr": "*fp32",
                      "grad_ptr": dtype, "stride_student_row": "i64",
                      "stride_grad_row": "i64", "n_rows": "i32", "n_cols": "i32",
                      "cols_per_split": "i32", "k": "i32", "inv_t": "fp32",
                      "hard_weight": "fp32", "ignore_index": "i32"},
                     dict(BLOCK_SIZE=2048, K_BLOCK=32, RENORMALIZE=renorm, HAS_HARD=on))
            variants += 3
        print(f"{dtype[1:]}: compiled", flush=True)
    print(f"{variants} kernel variants compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The C++ CPU kernel (torch.ops.autosteer.steer_step_cpu) against the PyTorch reference."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from _steer_cases import (
    assert_row_probe_scores,
    assert_row_tau_decisive,
    ARG_NAMES,
    LATCH_MODES,
    LAYOUTS,
    MASK_MODES,
    ROW_MODES,
    check_against_reference,
    fuzz_case_strategy,
    fuzz_examples,
    grid_id,
    grid_params,
    make_case,
    check_state_case,
    state_case,
    variant,
)
from autosteer.runtime import op as _op  # (loads the C++ extension: installed or JIT)

pytestmark = pytest.mark.skipif(_op.native_backend() is None, reason="C++ extension autosteer._C unavailable")


def run_cpp(case):
    out = case.clone()
    torch.ops.autosteer.steer_step_cpu(*case.call_args(out))
    return out


@pytest.mark.parametrize("p", grid_params(), ids=grid_id)
def test_grid(p):
    B, H, V, r, dt, i = p
    case = make_case(B=B, H=H, V=V, r=r, dtype=dt, **variant(i))
    check_against_reference(case, run_cpp(case))


@pytest.mark.parametrize("probe_layout", LAYOUTS)
@pytest.mark.parametrize("head_layout", LAYOUTS)
@pytest.mark.parametrize("logits_layout", ("contig", "sliced", "transposed"))
def test_layouts(probe_layout, head_layout, logits_layout):
    case = make_case(B=5, H=37, V=101, r=8, probe_layout=probe_layout, head_layout=head_layout,
                     logits_layout=logits_layout, latch_mode="mixed", mask_mode="all", seed=3)
    check_against_reference(case, run_cpp(case))


@pytest.mark.parametrize("row_mode", ROW_MODES)
@pytest.mark.parametrize("rows_dtype", (torch.int32, torch.int64))
def test_row_modes(row_mode, rows_dtype):
    case = make_case(B=9, H=64, V=256, r=8, row_mode=row_mode, rows_dtype=rows_dtype, seed=11)
    check_against_reference(case, run_cpp(case))


@pytest.mark.parametrize("latch_mode", LATCH_MODES)
@pytest.mark.parametrize("mask_mode", MASK_MODES)
@pytest.mark.parametrize("fire_rate", (0.0, 0.5, 1.0))
def test_latch_and_mask(latch_mode, mask_mode, fire_rate):
    case = make_case(B=17, H=37, V=101, r=8, latch_mode=latch_mode, mask_mode=mask_mode, fire_rate=fire_rate, seed=5)
    check_against_reference(case, run_cpp(case))


@pytest.mark.parametrize("nan_latches", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_nan_hidden(nan_latches, dtype):
    case = make_case(B=8, H=37, V=101, r=8, dtype=dtype, mask_mode="all", latch_mode="none", nan_probe_rows=True,
                     nan_latches=nan_latches, seed=2)
    out = run_cpp(case)
    check_against_reference(case, out)
    nan_rows = case.info["nan_rows"]
    assert torch.isnan(out["p_out"][nan_rows]).all()
    assert bool(out["latched"][nan_rows].all()) == nan_latches


def test_nan_head_rows_propagate():
    case = make_case(B=4, H=37, V=101, r=8, latch_mode="all", nan_head_rows=True, seed=4)
    check_against_reference(case, run_cpp(case))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_inf_and_huge_logits(dtype):
    case = make_case(B=6, H=37, V=101, r=8, dtype=dtype, latch_mode="mixed", special_logits=True, seed=6)
    out = run_cpp(case)
    check_against_reference(case, out)
    assert not torch.isnan(out["logits"][:, :3]).any()
    assert torch.isneginf(out["logits"][:, 0]).all()


def test_mixed_dtypes():
    case = make_case(B=5, H=64, V=256, r=8, dtype=torch.float32, seed=8, latch_mode="all")
    case.args["probe_hidden"] = case.args["probe_hidden"].half()
    case.args["head_hidden"] = case.args["head_hidden"].bfloat16()
    case.args["U"] = case.args["U"].half()
    check_against_reference(case, run_cpp(case))


@pytest.mark.parametrize("r", (16, 32, 64, 70))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_fast_transpose_ranks(r, dtype):
    # ranks with a compile-time transpose path (8/16/32/64), one above the 64-wide chunk, V not a block multiple
    case = make_case(B=6, H=64, V=64 * 5 + 3, r=r, dtype=dtype, latch_mode="all", seed=r)
    check_against_reference(case, run_cpp(case))
    # U stored transposed ([r, V] contiguous, U = Ut.t()) takes the row-copy path
    case.args["U"] = case.args["U"].t().contiguous().t()
    check_against_reference(case, run_cpp(case))


def test_degenerate_sizes():
    for kw in (dict(V=0), dict(r=0), dict(F=1, H=1)):
        base = dict(B=4, H=8, V=20, r=3, latch_mode="all", seed=1)
        base.update(kw)
        case = make_case(**base)
        check_against_reference(case, run_cpp(case))


def test_thread_count_invariant():
    case = make_case(B=17, H=96, V=1000, r=16, latch_mode="all", mask_mode="all", seed=9)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run_cpp(case)
        torch.set_num_threads(max(2, old))
        b = run_cpp(case)
    finally:
        torch.set_num_threads(old)
    for n in ("logits", "latched", "p_out"):
        assert torch.equal(a[n], b[n])


def test_row_out_of_range_raises_before_writing():
    case = make_case(B=3, H=8, V=20, r=2, latch_mode="all", mask_mode="all", seed=0)
    out = case.clone()
    out["head_rows"] = torch.tensor([0, 1, 99])
    with pytest.raises(RuntimeError, match="head_rows"):
        torch.ops.autosteer.steer_step_cpu(*case.call_args(out))
    assert torch.equal(out["logits"], case.args["logits"])


# --------------------------------------------------------------------------- per-row threshold


@pytest.mark.parametrize("row_tau_layout", ("contig", "strided"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("B,H,V,r", [(1, 37, 101, 8), (2, 64, 256, "full"), (5, 96, 130, 1), (17, 37, 101, 8)])
def test_row_tau(B, H, V, r, dtype, row_tau_layout):
    case = make_case(B=B, H=H, V=V, r=r, dtype=dtype, latch_mode="none", mask_mode="all", row_tau=True,
                     row_tau_layout=row_tau_layout, seed=B)
    assert_row_tau_decisive(case)
    check_against_reference(case, run_cpp(case))


@pytest.mark.parametrize("i", range(6))
def test_row_tau_variants(i):
    # mixed probe/latch patterns (rows not probed get row_tau=-1 and must ignore it), layouts, row modes
    case = make_case(B=11, H=37, V=101, r=8, row_tau=True, **variant(i))
    out = run_cpp(case)
    check_against_reference(case, out)
    unprobed = ~case.args["probe_mask"]
    assert torch.equal(out["latched"][unprobed], case.args["latched"][unprobed])


def test_row_tau_empty_batch():
    case = make_case(B=0, H=37, V=101, r=8, row_tau=True)
    assert case.row_tau is not None and case.row_tau.shape == (0,)
    check_against_reference(case, run_cpp(case))


@pytest.mark.parametrize("nan_latches", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_row_tau_nan_hidden(nan_latches, dtype):
    # NaN rows get row_tau=2 with nan_latches (never fires a finite score) and -1 without (always would)
    case = make_case(B=8, H=37, V=101, r=8, dtype=dtype, mask_mode="all", latch_mode="none", nan_probe_rows=True,
                     nan_latches=nan_latches, row_tau=True, seed=2)
    assert_row_tau_decisive(case)
    out = run_cpp(case)
    check_against_reference(case, out)
    nan_rows = case.info["nan_rows"]
    assert torch.isnan(out["p_out"][nan_rows]).all()
    assert bool(out["latched"][nan_rows].all()) == nan_latches
    assert bool(out["latched"][nan_rows].any()) == nan_latches


def test_row_tau_none_and_uniform_equal_scalar_tau():
    """row_tau=None is the old call bit for bit; row_tau = fp32(tau) everywhere gives the same result."""
    case = make_case(B=17, H=37, V=101, r=8, latch_mode="mixed", mask_mode="mixed", seed=12)
    old = run_cpp(case)
    none = case.clone()
    torch.ops.autosteer.steer_step_cpu(*case.call_args(none), None)
    uniform = case.clone()
    torch.ops.autosteer.steer_step_cpu(*case.call_args(uniform), torch.full((17,), case.tau))
    for n in ("logits", "latched", "p_out"):
        assert torch.equal(old[n].view(torch.uint8), none[n].view(torch.uint8)), n
        assert torch.equal(old[n].view(torch.uint8), uniform[n].view(torch.uint8)), n


@pytest.mark.parametrize("bad,match", [
    (lambda B: torch.zeros(B, dtype=torch.float64), "row_tau must be float32"),
    (lambda B: torch.zeros(B - 1), "row_tau must be 1-D of length B"),
    (lambda B: torch.zeros(B, 1), "row_tau must be 1-D of length B"),
], ids=("dtype", "length", "rank"))
def test_row_tau_checks_raise_before_writing(bad, match):
    case = make_case(B=3, H=8, V=20, r=2, latch_mode="all", mask_mode="all", seed=0)
    out = case.clone()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.autosteer.steer_step_cpu(*case.call_args(out), bad(3))
    for n in ("logits", "latched", "p_out"):
        assert torch.equal(out[n].view(torch.uint8), case.args[n].view(torch.uint8)), n


@settings(max_examples=fuzz_examples(200), deadline=None, derandomize=os.environ.get("AUTOSTEER_FUZZ_RANDOM") != "1",
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kw=fuzz_case_strategy())
def test_fuzz_cpp_vs_reference(kw):
    case = make_case(**kw)
    check_against_reference(case, run_cpp(case))


# --------------------------------------------------------------------------- stacked probes (row_probe)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("B,H,V,r,F", [(2, 37, 101, 8, 16), (5, 64, 256, "full", 7), (17, 96, 130, 1, 33)])
@pytest.mark.parametrize("weights_layout", ("contig", "strided"))
def test_row_probe(B, H, V, r, F, dtype, weights_layout):
    case = make_case(B=B, H=H, V=V, r=r, F=F, dtype=dtype, latch_mode="none", mask_mode="all", row_probe=True, seed=B,
                     weights_layout=weights_layout)
    out = run_cpp(case)
    assert_row_probe_scores(case, out)
    check_against_reference(case, out)


@pytest.mark.parametrize("i", range(4))
def test_row_probe_with_row_tau_variants(i):
    # monitor mode in a serving step: per-row probe AND per-row threshold, mixed probe/latch patterns
    case = make_case(B=11, H=37, V=101, r=8, row_tau=True, row_probe=True, **variant(i))
    out = run_cpp(case)
    check_against_reference(case, out)
    if case.args["probe_mask"].any():
        assert_row_probe_scores(case, out, both=False)  # the variant's probe mask may leave one probe unused


def test_row_probe_empty_batch():
    case = make_case(B=0, H=37, V=101, r=8, row_probe=True)
    assert case.row_probe.shape == (0,)
    check_against_reference(case, run_cpp(case))


def test_row_probe_single_probe_stack_equals_plain_call():
    """W1[None] with row_probe = 0 everywhere is the plain call bit for bit."""
    case = make_case(B=9, H=37, V=101, r=8, latch_mode="mixed", mask_mode="mixed", seed=3)
    old = run_cpp(case)
    st = case.clone()
    for n in ("W1", "b1", "w2"):
        st[n] = case.args[n][None]
    st["b2"] = case.args["b2"].reshape(1)
    torch.ops.autosteer.steer_step_cpu(*case.call_args(st), None, torch.zeros(9, dtype=torch.int32))
    for n in ("logits", "latched", "p_out"):
        assert torch.equal(old[n].view(torch.uint8), st[n].view(torch.uint8)), n


@pytest.mark.parametrize("bad,match", [
    (lambda c: dict(row_probe=torch.tensor([0, 1, 2, 0])), "row_probe.2.=2 out of range"),
    (lambda c: dict(row_probe=torch.tensor([0, -1, 1, 0])), "row_probe.1.=-1 out of range"),
    (lambda c: dict(row_probe=c.row_probe.float()), "row_probe must be int32 or int64"),
    (lambda c: dict(row_probe=c.row_probe[:-1]), "row_probe must be int32 or int64 .B=4"),
    (lambda c: dict(row_probe=None), "W1 must be .F, H. .3-D stacked probes need row_probe"),
    (lambda c: dict(b2=torch.zeros(3)), "stacked probes need b1 and w2"),
    (lambda c: dict(b2=c.args["b2"].reshape(2, 1)), "stacked probes need b1 and w2 .P=2, F=16. and b2 .P."),
])
def test_row_probe_bad_input_raises_before_writing(bad, match):
    case = make_case(B=4, H=8, V=20, r=2, latch_mode="none", mask_mode="all", row_probe=True, seed=0)
    out = case.clone()
    kw = bad(case)
    rp = kw.pop("row_probe", case.row_probe)
    out.update(kw)
    args = tuple(out[n] for n in ARG_NAMES) + (case.tau, case.eps, case.nan_latches, None, rp)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.autosteer.steer_step_cpu(*args)
    assert torch.equal(out["logits"], case.args["logits"]) and torch.equal(out["latched"], case.args["latched"])


# --------------------------------------------------------------------------- per-request state by index (state_rows)


@pytest.mark.parametrize("kw", [
    dict(B=1, H=37, V=101, r=8), dict(B=5, H=64, V=256, r="full", dtype=torch.bfloat16),
    dict(B=9, H=37, V=101, r=8, row_tau=True, row_probe=True), dict(B=17, H=96, V=130, r=1, dtype=torch.float16),
    dict(B=6, H=37, V=101, r=8, row_tau=True, nan_probe_rows=True, nan_latches=True),
], ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("idx", (torch.int64, torch.int32))
def test_state_rows(kw, idx):
    """The per-request tensors as tables addressed through state_rows: the results of the rows equal the
    reference on rows, entries no row names are never read (they are set to probe and steer) nor written."""
    case = make_case(latch_mode="mixed", mask_mode="mixed", seed=kw["B"], **kw)
    sc = state_case(case, extra=4, seed=kw["B"], dtype=idx)
    a, t = sc.clone_args()
    torch.ops.autosteer.steer_step_cpu(*sc.call_args(a, t))
    check_state_case(sc, a)


def test_state_rows_out_of_range_raises_before_writing():
    case = make_case(B=3, H=8, V=20, r=2, latch_mode="all", mask_mode="all", seed=0)
    sc = state_case(case, extra=2)
    a, t = sc.clone_args()
    sc.state_rows = torch.tensor([0, 5, 2])  # S = 5
    with pytest.raises(RuntimeError, match=r"state_rows\[1\]=5 out of range \[0, 5\)"):
        torch.ops.autosteer.steer_step_cpu(*sc.call_args(a, t))
    assert torch.equal(a["logits"], case.args["logits"]) and torch.equal(a["latched"], sc.tables["latched"])
    sc.state_rows = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="state_rows must be 1-D of length B=3"):
        torch.ops.autosteer.steer_step_cpu(*sc.call_args(a, t))


# --------------------------------------------------------------------------- probe input from several layers (probe_extra, probe_sum)
from _steer_cases import assert_parts_scores  # noqa: E402


# (layers, probe_sum): every combination with more than one tensor (the single-tensor call is the rest of this file)
@pytest.mark.parametrize("layers,probe_sum", [(1, 2), (2, 1), (2, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("probe_layout", ("contig", "sliced", "transposed"))
def test_probe_parts(layers, probe_sum, dtype, probe_layout):
    """k layers (each the fp32 sum of probe_sum tensors, in rotating layouts: row strides > H, transposed) read by
    the kernel itself: p_out and the steering delta equal the reference's; the scores are the layers' (fp64)."""
    case = make_case(B=9, H=37, V=101, r=8, dtype=dtype, layers=layers, probe_sum=probe_sum, probe_layout=probe_layout,
                     latch_mode="none", mask_mode="all", row_mode="varlen", seed=layers * 10 + probe_sum)
    assert len(case.probe_extra) == layers * probe_sum - 1
    out = run_cpp(case)
    check_against_reference(case, out)
    assert_parts_scores(case, out)
    assert out["latched"].any() and not out["latched"].all(), case  # some rows steered, some not


@pytest.mark.parametrize("kw", [
    dict(B=6, H=37, V=101, r=8, layers=2, probe_sum=2, row_probe=True, row_tau=True),
    dict(B=17, H=64, V=256, r="full", dtype=torch.bfloat16, layers=4, probe_sum=2, row_probe=True),
    dict(B=5, H=37, V=101, r=8, dtype=torch.float16, layers=3, probe_sum=1, nan_probe_rows=True, nan_latches=True),
    dict(B=5, H=37, V=101, r=8, layers=4, probe_sum=1, weights_layout="strided", row_probe=True),
], ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("with_state_rows", (False, True))
def test_probe_parts_stacked_and_state_rows(kw, with_state_rows):
    """Several layers with stacked probes + row_probe, per-row thresholds, NaN in an extra tensor, strided weights,
    and through state_rows (slot tables)."""
    case = make_case(latch_mode="mixed", mask_mode="all", seed=kw["B"], **kw)
    if with_state_rows:
        sc = state_case(case, extra=3, seed=kw["B"])
        a, t = sc.clone_args()
        torch.ops.autosteer.steer_step_cpu(*sc.call_args(a, t))
        check_state_case(sc, a)
        out = sc.rows_of(a)
    else:
        out = run_cpp(case)
        check_against_reference(case, out)
    if kw.get("row_probe"):
        assert_row_probe_scores(case, out)
    if not kw.get("nan_probe_rows"):
        assert_parts_scores(case, out)
    else:  # the NaN sits in the last extra tensor: those rows score NaN and latch (nan_latches)
        nan_rows = case.info["nan_rows"]
        assert nan_rows and torch.isnan(out["p_out"][nan_rows]).all() and out["latched"][nan_rows].all(), case


def test_probe_parts_empty_equals_single_tensor_call():
    """probe_extra=[] (or None), probe_sum=1 is today's call, bit for bit."""
    case = make_case(B=7, H=37, V=101, r=8, latch_mode="mixed", mask_mode="mixed", seed=3)
    base = run_cpp(case)
    for extra in ([], None):
        out = case.clone()
        torch.ops.autosteer.steer_step_cpu(*case.call_args(out), None, None, None, extra, 1)
        for n in ("logits", "latched", "p_out"):
            assert torch.equal(out[n].view(torch.uint8), base[n].view(torch.uint8)), (extra, n)


@settings(max_examples=fuzz_examples(60), deadline=None, derandomize=os.environ.get("AUTOSTEER_FUZZ_RANDOM") != "1",
          suppress_health_check=[HealthCheck.too_slow])
@given(kw=fuzz_case_strategy(max_B=12, max_H=48, max_V=120, parts=True))
def test_fuzz_cpp_vs_reference_parts(kw):
    case = make_case(**kw)
    check_against_reference(case, run_cpp(case))


def _parts_bad(case, **change):
    extra = list(case.probe_extra)
    W1 = case.args["W1"]
    probe_sum = change.pop("probe_sum", case.probe_sum)
    if "extra" in change:
        extra = change.pop("extra")(extra)
    if "W1" in change:
        W1 = change.pop("W1")(W1)
    return extra, probe_sum, W1


@pytest.mark.parametrize("change,match", [
    (dict(W1=lambda w: w[:, :-37]), r"W1 takes 111 input features but the probe reads k=4 layer\(s\) x H=37 = 148 "
                                     r"\(probe_hidden \+ 7 probe_extra, probe_sum=2\)"),
    (dict(extra=lambda e: e[:-1] + [e[-1][:, :-1]]), r"probe_extra\[6\] must be \[N=\d+, H=37\] like probe_hidden"),
    (dict(extra=lambda e: e[:-1] + [e[-1][:-1]]), r"probe_extra\[6\] must be \[N=\d+, H=37\] like probe_hidden"),
    (dict(extra=lambda e: [e[0].float()] + e[1:]), r"probe_extra\[0\] must have probe_hidden's dtype"),
    (dict(extra=lambda e: e[:2] + [e[2].to("meta")] + e[3:]), r"probe_extra\[2\] must be on the CPU"),
    (dict(probe_sum=3), "probe_sum must be 1 or 2, got 3"),
    (dict(extra=lambda e: e[:-1]), r"probe_sum=2 must divide the number of probe input tensors, got 7"),
    (dict(probe_sum=1, W1=lambda w: torch.cat([w, w], 1)), r"the probe reads at most 4 layers, got k=8"),
])
def test_probe_parts_bad_input_raises_before_writing(change, match):
    case = make_case(B=4, H=37, V=20, r=2, dtype=torch.float16, layers=4, probe_sum=2, latch_mode="none",
                     mask_mode="all", seed=0)
    out = case.clone()
    extra, probe_sum, W1 = _parts_bad(case, **change)
    out["W1"] = W1
    args = tuple(out[n] for n in ARG_NAMES) + (case.tau, case.eps, case.nan_latches, None, None, None, extra, probe_sum)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.autosteer.steer_step_cpu(*args)
    assert torch.equal(out["logits"], case.args["logits"]) and torch.equal(out["latched"], case.args["latched"])
    assert torch.equal(out["p_out"], case.args["p_out"])

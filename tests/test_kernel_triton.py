"""The fused Triton kernel (autosteer.kernels.steer_step) against the PyTorch reference.

On a CPU-only machine the kernel runs in Triton's interpreter. Triton decides interpreter
mode when ``triton.language`` is first imported (its builtins are jit functions decorated at
import time), NOT at launch: TRITON_INTERPRET=1 must be in the environment before anything
imports triton: tests/conftest.py sets it before any test module is imported. On a GPU machine run with AUTOSTEER_TEST_NATIVE_TRITON=1 (and
TRITON_INTERPRET unset) to compile the kernel for CUDA instead; CPU cases are then skipped.
"""
import os

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from _steer_cases import (  # noqa: E402
    assert_row_probe_scores,
    assert_row_tau_decisive,
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
    run_reference,
    state_case,
    variant,
)

triton = pytest.importorskip("triton")
from autosteer.kernels import steer_step as ks  # noqa: E402
import autosteer.runtime.op  # noqa: E402,F401  (registers torch.ops.autosteer.steer_step_ref, used below)
from autosteer.runtime.reference_op import steer_step_reference  # noqa: E402

INTERPRETING = ks.interpreting()
# fp16 overflow to inf is the expected result for huge logits; numpy (interpreter) warns about it
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")]
DEVICES = []
if INTERPRETING:
    DEVICES.append("cpu")
if torch.cuda.is_available() and not INTERPRETING:
    DEVICES.append("cuda")
if not DEVICES:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set and no CUDA device is present: set "
                "TRITON_INTERPRET=1 in the environment", allow_module_level=True)


def run_triton(case, **kw):
    out = case.clone()
    ks.steer_step_triton(*case.call_args(out), **kw)
    return out


def test_interpreter_mode_is_what_the_environment_asked_for():
    if os.environ.get("AUTOSTEER_TEST_NATIVE_TRITON") != "1":
        assert INTERPRETING, "TRITON_INTERPRET=1 was set before importing triton, the kernel must be interpreted"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", grid_params(), ids=grid_id)
def test_grid(p, device):
    B, H, V, r, dt, i = p
    case = make_case(B=B, H=H, V=V, r=r, dtype=dt, device=device, **variant(i))
    check_against_reference(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("probe_layout", LAYOUTS)
@pytest.mark.parametrize("head_layout", LAYOUTS)
def test_layouts(probe_layout, head_layout, device):
    logits_layout = "transposed" if probe_layout == head_layout else "sliced"
    case = make_case(B=5, H=37, V=101, r=8, probe_layout=probe_layout, head_layout=head_layout,
                     logits_layout=logits_layout, latch_mode="mixed", mask_mode="all", seed=3, device=device)
    check_against_reference(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row_mode", ROW_MODES)
@pytest.mark.parametrize("rows_dtype", (torch.int32, torch.int64))
def test_row_modes(row_mode, rows_dtype, device):
    case = make_case(B=9, H=64, V=256, r=8, row_mode=row_mode, rows_dtype=rows_dtype, seed=11, device=device)
    check_against_reference(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("latch_mode", LATCH_MODES)
@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_latch_and_mask(latch_mode, mask_mode, device):
    case = make_case(B=17, H=37, V=101, r=8, latch_mode=latch_mode, mask_mode=mask_mode, seed=5, device=device)
    check_against_reference(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nan_latches", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_nan_hidden(nan_latches, dtype, device):
    case = make_case(B=8, H=37, V=101, r=8, dtype=dtype, mask_mode="all", latch_mode="none", nan_probe_rows=True,
                     nan_latches=nan_latches, seed=2, device=device)
    out = run_triton(case)
    check_against_reference(case, out)
    nan_rows = case.info["nan_rows"]
    assert torch.isnan(out["p_out"][nan_rows]).all()
    assert bool(out["latched"][nan_rows].all()) == nan_latches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_inf_and_huge_logits(dtype, device):
    case = make_case(B=6, H=37, V=101, r=8, dtype=dtype, latch_mode="mixed", special_logits=True, seed=6,
                     device=device)
    out = run_triton(case)
    check_against_reference(case, out)
    assert not torch.isnan(out["logits"][:, :3]).any()
    assert torch.isneginf(out["logits"][:, 0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h_splits,tiles,block_v", [(1, 1, 16), (3, 2, 16), (7, 3, 32), (50, 50, 16)])
def test_tilings(h_splits, tiles, block_v, device):
    # hidden splits of the probe (more than the hidden size has chunks: clamped), several vocabulary
    # tiles per blend program (more than there are: the rest masked), several rank slices of t
    case = make_case(B=5, H=37, V=101, r=8, latch_mode="none", mask_mode="all", fire_rate=0.6, seed=7,
                     device=device)
    check_against_reference(case, run_triton(case, h_splits=h_splits, tiles_per_program=tiles, block_v=block_v))
    case = make_case(B=3, H=96, V=130, r="full", latch_mode="mixed", mask_mode="mixed", seed=8, device=device)
    out = run_triton(case, h_splits=h_splits, tiles_per_program=tiles, block_v=block_v)
    check_against_reference(case, out)
    assert_delta(case, out, require=False)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes(device):
    case = make_case(B=5, H=64, V=256, r=8, dtype=torch.float32, seed=8, latch_mode="all", device=device)
    case.args["probe_hidden"] = case.args["probe_hidden"].half()
    case.args["head_hidden"] = case.args["head_hidden"].bfloat16()
    case.args["U"] = case.args["U"].half()
    check_against_reference(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_sizes(device):
    for kw in (dict(V=0), dict(r=0), dict(F=1, H=1), dict(B=0)):
        base = dict(B=4, H=8, V=20, r=3, latch_mode="all", seed=1, device=device)
        base.update(kw)
        case = make_case(**base)
        check_against_reference(case, run_triton(case))


def test_launcher_asserts_preconditions():
    case = make_case(B=3, H=8, V=20, r=2, seed=0, device=DEVICES[0])
    bad = case.clone()
    bad["U"] = bad["U"][:, :1]
    with pytest.raises(AssertionError, match="Bt must be"):
        ks.steer_step_triton(*case.call_args(bad))
    bad = case.clone()
    bad["probe_rows"] = bad["probe_rows"].float()
    with pytest.raises(AssertionError, match="probe_rows"):
        ks.steer_step_triton(*case.call_args(bad))


def _launch(case, *extra, name="latch", **kw):
    """(grid, args, meta) of one of the call's launches."""
    ln = next(x for x in ks.launch_configs(*case.call_args(), *extra, **kw) if x.name == name)
    return ln.grid, ln.args, ln.meta


def test_launch_config_has_no_data_dependence():
    """The launcher reads only shapes/strides/dtypes: the same launches for any tensor values."""
    case = make_case(B=5, H=37, V=101, r=8, seed=0)
    other = make_case(B=5, H=37, V=101, r=8, seed=1, latch_mode="all", mask_mode="none")
    l1, l2 = ks.launch_configs(*case.call_args()), ks.launch_configs(*other.call_args())
    assert [x.name for x in l1] == [x.name for x in l2] == ["probe", "latch", "blend"]
    scalars = lambda a: [x for x in a if not isinstance(x, torch.Tensor) and not isinstance(x, float)]  # noqa: E731
    for x, y in zip(l1, l2):
        assert x.grid == y.grid and x.meta == y.meta and scalars(x.args) == scalars(y.args)
    assert ks.launch_configs(*make_case(B=0, H=37, V=101, r=8).call_args()) == []  # B == 0: nothing
    assert [x.name for x in ks.launch_configs(*make_case(B=2, H=37, V=0, r=8).call_args())] == ["probe", "latch"]


def test_scratch_is_sized_from_shapes():
    """One fp32 scratch [B, R + h_splits * F] (t, then the probe's partial sums), from shapes alone."""
    case = make_case(B=5, H=37, V=101, r=8, F=16, seed=0)
    launches = ks.launch_configs(*case.call_args(), h_splits=2)
    probe, latch, blend = launches
    part = probe.args[ks.probe_kernel.arg_names.index("part_ptr")]
    t = blend.args[ks.blend_kernel.arg_names.index("t_ptr")]
    assert part.shape == (5, 2 * 16) and t.shape == (5, 8) and part.dtype == t.dtype == torch.float32
    assert part.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # one allocation
    assert latch.args[ks.latch_kernel.arg_names.index("part_ptr")] is part


# --------------------------------------------------------------------------- per-row threshold


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("B,H,V,r,row_tau_layout", [(1, 37, 101, 8, "contig"), (2, 96, 130, "full", "strided"),
                                                     (5, 64, 256, 1, "contig"), (17, 37, 101, 8, "strided")])
def test_row_tau(B, H, V, r, row_tau_layout, dtype, device):
    case = make_case(B=B, H=H, V=V, r=r, dtype=dtype, latch_mode="none", mask_mode="all", row_tau=True,
                     row_tau_layout=row_tau_layout, seed=B, device=device)
    assert_row_tau_decisive(case)
    check_against_reference(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(3))
def test_row_tau_variants(i, device):
    # mixed probe/latch patterns (rows not probed get row_tau=-1 and must ignore it), layouts, row modes
    case = make_case(B=11, H=37, V=101, r=8, row_tau=True, device=device, **variant(i))
    out = run_triton(case)
    check_against_reference(case, out)
    unprobed = ~case.args["probe_mask"]
    assert torch.equal(out["latched"][unprobed], case.args["latched"][unprobed])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h_splits,block_v", [(3, 16), (50, 16)])
def test_row_tau_tilings(h_splits, block_v, device):
    # every rank slice's program of a row block loads the thresholds: all must agree on the latch
    case = make_case(B=6, H=37, V=101, r="full", latch_mode="none", mask_mode="all", row_tau=True, seed=7,
                     device=device, row_tau_layout="strided")
    assert_row_tau_decisive(case)
    check_against_reference(case, run_triton(case, h_splits=h_splits, tiles_per_program=3, block_v=block_v))


@pytest.mark.parametrize("device", DEVICES)
def test_row_tau_empty_batch(device):
    case = make_case(B=0, H=37, V=101, r=8, row_tau=True, device=device)
    assert case.row_tau is not None and case.row_tau.shape == (0,)
    check_against_reference(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nan_latches", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_row_tau_nan_hidden(nan_latches, dtype, device):
    # NaN rows get row_tau=2 with nan_latches (never fires a finite score) and -1 without (always would)
    case = make_case(B=8, H=37, V=101, r=8, dtype=dtype, mask_mode="all", latch_mode="none", nan_probe_rows=True,
                     nan_latches=nan_latches, row_tau=True, seed=2, device=device)
    assert_row_tau_decisive(case)
    out = run_triton(case)
    check_against_reference(case, out)
    nan_rows = case.info["nan_rows"]
    assert torch.isnan(out["p_out"][nan_rows]).all()
    assert bool(out["latched"][nan_rows].all()) == nan_latches
    assert bool(out["latched"][nan_rows].any()) == nan_latches


@pytest.mark.parametrize("device", DEVICES)
def test_row_tau_none_and_uniform_equal_scalar_tau(device):
    """row_tau=None is the old call bit for bit; row_tau = fp32(tau) everywhere gives the same result."""
    case = make_case(B=9, H=37, V=101, r=8, latch_mode="mixed", mask_mode="mixed", seed=12, device=device)
    old = run_triton(case)
    none = case.clone()
    ks.steer_step_triton(*case.call_args(none), None)
    uniform = case.clone()
    ks.steer_step_triton(*case.call_args(uniform), torch.full((9,), case.tau, device=device))
    for n in ("logits", "latched", "p_out"):
        assert torch.equal(old[n].view(torch.uint8), none[n].view(torch.uint8)), n
        assert torch.equal(old[n].view(torch.uint8), uniform[n].view(torch.uint8)), n


def test_row_tau_launch_config():
    """row_tau is a run-time flag (no constexpr: one compiled variant with and without it);
    without it the pointer slot holds p_out (never read) and the config otherwise matches."""
    case = make_case(B=5, H=37, V=101, r=8, seed=0, device=DEVICES[0])
    g0, a0, m0 = _launch(case)
    rt = torch.rand(10, device=DEVICES[0])[::2]
    g1, a1, m1 = _launch(case, rt)
    assert g0 == g1 and m0 == m1 and "HAS_ROW_TAU" not in m0
    names = [n for n in ks.latch_kernel.arg_names if n not in m0]
    assert len(a0) == len(a1) == len(names)
    i = names.index("rtau_ptr")
    assert a0[i] is case.args["p_out"] and a1[i] is rt and a1[i + 1] == 2
    j = names.index("has_row_tau")
    assert (a0[j], a1[j]) == (0, 1)
    rest = lambda a: [x for k, x in enumerate(a) if k not in (i, i + 1, j) and not isinstance(x, torch.Tensor)]  # noqa: E731
    assert rest(a0) == rest(a1)


def test_launcher_asserts_row_tau():
    case = make_case(B=3, H=8, V=20, r=2, seed=0, device=DEVICES[0])
    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(2), torch.zeros(3, 1)):
        with pytest.raises(AssertionError, match="row_tau"):
            ks.steer_step_triton(*case.call_args(case.clone()), bad.to(DEVICES[0]))


@settings(max_examples=max(1, fuzz_examples(200) // 4), deadline=None,
          derandomize=os.environ.get("AUTOSTEER_FUZZ_RANDOM") != "1",
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kw=fuzz_case_strategy(max_B=8, max_H=48, max_V=160))
def test_fuzz_triton_vs_reference(kw):
    case = make_case(device=DEVICES[0], **kw)
    check_against_reference(case, run_triton(case))


# --------------------------------------------------------------------------- stacked probes (row_probe)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("B,H,V,r,F", [(2, 37, 101, 8, 16), (5, 96, 130, "full", 7), (17, 64, 256, 1, 33)])
@pytest.mark.parametrize("weights_layout", ("contig", "strided"))
def test_row_probe(B, H, V, r, F, dtype, weights_layout, device):
    case = make_case(B=B, H=H, V=V, r=r, F=F, dtype=dtype, latch_mode="none", mask_mode="all", row_probe=True,
                     seed=B, device=device, weights_layout=weights_layout)
    out = run_triton(case)
    assert_row_probe_scores(case, out)
    check_against_reference(case, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(2))
def test_row_probe_with_row_tau_variants(i, device):
    # monitor mode in a serving step: per-row probe AND per-row threshold, mixed patterns, vocab splits
    case = make_case(B=11, H=37, V=101, r=8, row_tau=True, row_probe=True, device=device, **variant(i))
    out = run_triton(case, h_splits=2, tiles_per_program=3, block_v=16)
    check_against_reference(case, out)
    if case.args["probe_mask"].any():
        assert_row_probe_scores(case, out, both=False)  # the variant's probe mask may leave one probe unused


@pytest.mark.parametrize("device", DEVICES)
def test_row_probe_empty_batch(device):
    case = make_case(B=0, H=37, V=101, r=8, row_probe=True, device=device)
    check_against_reference(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
def test_row_probe_single_probe_stack_equals_plain_call(device):
    """P = 1: W1[None] with row_probe = 0 everywhere is the plain call bit for bit."""
    case = make_case(B=9, H=37, V=101, r=8, latch_mode="mixed", mask_mode="mixed", seed=3, device=device)
    old = run_triton(case)
    st = case.clone()
    for n in ("W1", "b1", "w2"):
        st[n] = case.args[n][None]
    st["b2"] = case.args["b2"].reshape(1)
    ks.steer_step_triton(*case.call_args(st), None, torch.zeros(9, dtype=torch.int32, device=device))
    for n in ("logits", "latched", "p_out"):
        assert torch.equal(old[n].view(torch.uint8), st[n].view(torch.uint8)), n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nan_latches", (False, True))
def test_row_probe_out_of_range_scores_nan(nan_latches, device):
    """The CUDA path does not range-check probe indices on the host: an index outside [0, P) scores
    the row NaN (never another probe's score), and the NaN policy decides its latch."""
    case = make_case(B=5, H=37, V=101, r=8, latch_mode="none", mask_mode="all", row_probe=True, seed=1,
                     nan_latches=nan_latches, device=device)
    out = case.clone()
    bad = case.row_probe.clone()
    bad[1], bad[3] = 2, -1
    ks.steer_step_triton(*case.call_args(out)[:-2], None, bad)
    ok = [0, 2, 4]
    assert torch.isnan(out["p_out"][[1, 3]]).all()
    assert out["latched"][[1, 3]].tolist() == [nan_latches] * 2
    ref = case.clone()
    torch.ops.autosteer.steer_step_ref(*case.call_args(ref))  # the in-range rows as usual
    torch.testing.assert_close(out["p_out"][ok], ref["p_out"][ok], rtol=0, atol=1e-5)
    assert torch.equal(out["latched"][ok], ref["latched"][ok])


def test_row_probe_launch_config():
    """HAS_ROW_PROBE follows row_probe; a 2-D W1 passes probe strides 0 and P = 1."""
    plain = make_case(B=4, H=37, V=101, r=8, seed=0)
    stacked = make_case(B=4, H=37, V=101, r=8, seed=0, row_probe=True)
    _, a1, m1 = _launch(plain, name="probe")
    _, a2, m2 = _launch(stacked, name="probe")
    assert m1["HAS_ROW_PROBE"] is False and m2["HAS_ROW_PROBE"] is True
    i = next(k for k, x in enumerate(a1) if x is plain.args["W1"])
    assert a1[i + 1] == 0 and a2[i + 1] == stacked.args["W1"].stride(0) == 37 * 16
    names = ks.probe_kernel.arg_names
    assert (a1[names.index("P")], a2[names.index("P")]) == (1, 2)
    assert _launch(plain)[2]["HAS_ROW_PROBE"] is False and _launch(stacked)[2]["HAS_ROW_PROBE"] is True


def test_launcher_asserts_row_probe():
    case = make_case(B=4, H=37, V=101, r=8, seed=0, row_probe=True)
    args = case.call_args(case.clone())
    with pytest.raises(AssertionError, match="row_probe must be int32/int64"):
        ks.steer_step_triton(*args[:-1], case.row_probe.float())
    with pytest.raises(AssertionError, match="W1 must be .F, H"):
        ks.steer_step_triton(*args[:-1], None)


# --------------------------------------------------------------------------- serving layouts, delta, bad indices


def serving_weights(case) -> None:
    """U and Bt as the integrations build them (``refusal_basis`` / ``SteerWeights.from_pack``):
    fp32, U r-major ([r, V] memory viewed as [V, r]), Bt a contiguous [r, H]."""
    U = case.args["U"].float()
    case.args["U"] = U.t().contiguous().t()
    case.args["Bt"] = case.args["Bt"].float().contiguous()
    if U.shape[1] > 1 and U.shape[0] > 1:
        assert case.args["U"].stride() == (1, U.shape[0])


def assert_delta(case, out, *, fp32_rtol: float = 1e-5, require: bool = True) -> None:
    """The steering delta ``out - (1+eps) z`` of the latched rows against ``eps U (Bt g)`` in fp64.

    A whole-row check is dominated by ``(1+eps) z``; this one sees errors in the delta itself.
    fp32 logits: relative error ``||d - d64|| / ||d64||`` at most ``fp32_rtol``; fp16/bf16 logits
    (where rounding the output is a large part of the delta): the kernel's delta error at most
    twice the reference's own (the reference run in the low precision), as the logits check does.
    """
    ref = run_reference(case)
    lat = ref["latched"].cpu()
    if not lat.any():
        assert not require, f"no latched row: the delta check would be vacuous {case}"
        return
    rows = lat.nonzero().flatten()
    a = {k: v.cpu() for k, v in case.args.items()}
    eps = case.eps
    z = a["logits"][rows].double()
    g = a["head_hidden"].double()[a["head_rows"].long()[rows]]
    d64 = eps * ((g @ a["Bt"].double().t()) @ a["U"].double().t())
    d_k = out["logits"].cpu()[rows].double() - (1.0 + eps) * z
    d_r = ref["logits"].cpu()[rows].double() - (1.0 + eps) * z
    ok = torch.isfinite(z) & torch.isfinite(d64) & (z.abs() < 1e4)  # finite, not the huge-logit sentinels
    assert ok.any(), case
    assert torch.isfinite(d_k[ok]).all(), f"non-finite delta {case}"
    den = d64[ok].norm().item()
    err_k = (d_k[ok] - d64[ok]).norm().item() / den
    err_r = (d_r[ok] - d64[ok]).norm().item() / den
    if out["logits"].dtype == torch.float32:
        assert err_k <= fp32_rtol, f"delta relative error {err_k:.3e} > {fp32_rtol} (reference: {err_r:.3e}) {case}"
    else:
        assert err_k <= 2 * err_r + 1e-6, f"delta error {err_k:.3e} > 2 x reference {err_r:.3e} {case}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("r", (1, 8, 16, 64, "full"))
def test_r_major_U(r, dtype, device):
    """U r-major (stride (1, V)) and fp32, as serving builds it, with hidden states and logits in dtype."""
    case = make_case(B=5, H=96, V=300, r=r, dtype=dtype, latch_mode="mixed", mask_mode="mixed", seed=21, device=device)
    serving_weights(case)
    out = run_triton(case, h_splits=3, tiles_per_program=3, block_v=32)
    check_against_reference(case, out)
    assert_delta(case, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("monitor", (False, True), ids=("prefill", "monitor-stacked"))
def test_bf16_serving_size(monitor, device):
    """bf16 hidden states and logits at SmolLM2's size (H=576, V=49152, r=16, F=64), serving's
    U/Bt; monitor mode: per-row thresholds and stacked probes."""
    case = make_case(B=4, H=576, V=49152, r=16, F=64, dtype=torch.bfloat16, latch_mode="mixed", mask_mode="all",
                     fire_rate=0.8, eps=0.5, seed=5, row_tau=monitor, row_probe=monitor, device=device)
    serving_weights(case)
    out = run_triton(case)
    check_against_reference(case, out)
    assert_delta(case, out)
    assert int(out["latched"].sum()) >= 2, case  # the delta check saw more than the row latched on entry


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(6))
def test_delta_grid(i, device):
    """The delta check over the rotation of layouts, row modes and latch patterns, fp32 and bf16."""
    r = (8, "full", 1)[i % 3]
    dtype = (torch.float32, torch.bfloat16)[i % 2]
    case = make_case(B=7, H=64, V=256, r=r, dtype=dtype, device=device, **dict(variant(i), latch_mode="mixed"))
    out = run_triton(case, h_splits=1 + i % 2, tiles_per_program=2 + i % 2, block_v=32)
    check_against_reference(case, out)
    assert_delta(case, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,r,logits_dtype,latch_mode", [(1, 16, torch.bfloat16, "all"), (1, 64, torch.float32, "none"),
                                                        (20, 16, torch.bfloat16, "mixed"), (20, 64, torch.float32, "mixed")])
def test_serving_size_blend(B, r, logits_dtype, latch_mode, device):
    """SmolLM2's size (H=576, V=49152) with serving's U/Bt (r-major fp32 U), bf16 hidden states:
    B=1 and a batch over one row block (16), several latch patterns, the delta checked directly."""
    case = make_case(B=B, H=576, V=49152, r=r, F=64, dtype=torch.bfloat16, latch_mode=latch_mode, mask_mode="all",
                     fire_rate=0.5, eps=0.5, seed=B + r, device=device)
    case.args["logits"] = case.args["logits"].to(logits_dtype)
    serving_weights(case)
    out = run_triton(case)
    check_against_reference(case, out)
    lat = run_reference(case)["latched"]
    assert_delta(case, out, require=bool(lat.any()))
    if B > 1:
        assert 0 < int(lat.sum()) < B, "a mixed batch: some rows steered, some not"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nan_latches", (False, True))
def test_row_blocks_with_bad_rows_and_stacked_probes(nan_latches, device):
    """B = 37 (three row blocks of 16): stacked probes, per-row thresholds, out-of-range probe rows,
    probe indices and head rows in different blocks; the in-range rows as the reference computes them."""
    case = make_case(B=37, H=70, V=300, r=16, latch_mode="mixed", mask_mode="mixed", row_tau=True, row_probe=True,
                     nan_latches=nan_latches, seed=9, device=device)
    N, M = case.args["probe_hidden"].shape[0], case.args["head_hidden"].shape[0]
    out = case.clone()
    out["probe_mask"] = case.args["probe_mask"].clone()
    prow, hrow, rprobe = case.args["probe_rows"].clone(), case.args["head_rows"].clone(), case.row_probe.clone()
    bad_probe, bad_k, bad_head = [3, 20], [17, 35], [5, 33]
    out["probe_mask"][bad_probe + bad_k] = True
    prow[bad_probe] = torch.tensor([N, -1])
    rprobe[bad_k] = torch.tensor([2, -5], dtype=rprobe.dtype)
    hrow[bad_head] = torch.tensor([M + 4, -1])
    out["latched"][bad_probe + bad_k] = False  # the NaN policy alone decides their latch
    out["latched"][bad_head] = True
    out["probe_rows"], out["head_rows"] = prow, hrow
    args = list(case.call_args(out))
    args[-1] = rprobe
    ks.steer_step_triton(*args, h_splits=2, tiles_per_program=2, block_v=32)
    bad = bad_probe + bad_k
    assert torch.isnan(out["p_out"][bad]).all() and out["latched"][bad].tolist() == [nan_latches] * 4
    assert torch.isnan(out["p_out"][bad_head]).all() and out["latched"][bad_head].all()
    assert torch.equal(out["logits"][bad_head], case.args["logits"][bad_head])
    # the other rows: the reference on the same inputs without the bad rows' effects
    good = [b for b in range(37) if b not in bad + bad_head]
    ref = case.clone()
    ref["probe_mask"] = out["probe_mask"].clone()
    ref["probe_mask"][bad] = False
    ref["latched"][bad_head] = False
    steer_step_reference(*case.call_args(ref))
    torch.testing.assert_close(out["p_out"][good], ref["p_out"][good], rtol=0, atol=1e-5)
    assert torch.equal(out["latched"][good], ref["latched"][good])
    # (equal_nan: rows neither probed nor latched carry a NaN sentinel, untouched by both)
    torch.testing.assert_close(out["logits"][good], ref["logits"][good], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert bool(ref["latched"][good].any()) and not bool(ref["latched"][good].all())


def test_delta_check_can_fail():
    """A kernel off by 1e-3 of the delta passes the whole-row check's scale but not the delta check."""
    case = make_case(B=4, H=64, V=256, r=8, latch_mode="all", mask_mode="none", seed=2)
    out = run_reference(case)
    rows = out["latched"].nonzero().flatten()
    z = case.args["logits"][rows]
    out["logits"][rows] = z * (1 + case.eps) + (out["logits"][rows] - z * (1 + case.eps)) * (1 + 1e-3)
    with pytest.raises(AssertionError, match="delta relative error"):
        assert_delta(case, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nan_latches", (False, True))
@pytest.mark.parametrize("rows_dtype", (torch.int32, torch.int64))
def test_out_of_range_probe_rows(nan_latches, rows_dtype, device):
    """A probe row outside [0, N) reads nothing and scores NaN: the NaN policy decides the latch
    (fail closed latches and steers the row); the other rows are as the reference computes them."""
    case = make_case(B=6, H=37, V=101, r=8, latch_mode="none", mask_mode="all", nan_latches=nan_latches,
                     rows_dtype=rows_dtype, seed=3, device=device)
    N = case.args["probe_hidden"].shape[0]
    bad_rows = [1, 4, 5]
    rows = case.args["probe_rows"].clone()
    rows[1], rows[4], rows[5] = N, -1, 2**31 - 1
    out = case.clone()
    out["probe_rows"] = rows
    ks.steer_step_triton(*case.call_args(out), h_splits=2, tiles_per_program=3, block_v=16)
    good = [b for b in range(6) if b not in bad_rows]
    ref = run_reference(case)
    assert torch.isnan(out["p_out"][bad_rows]).all(), out["p_out"]
    assert out["latched"][bad_rows].tolist() == [nan_latches] * 3
    torch.testing.assert_close(out["p_out"][good], ref["p_out"][good], rtol=0, atol=1e-5)
    assert torch.equal(out["latched"][good], ref["latched"][good])
    torch.testing.assert_close(out["logits"][good], ref["logits"][good], rtol=1e-5, atol=1e-5)
    if nan_latches:  # latched by the policy: steered like a row latched on entry
        fc = case.clone()
        fc["latched"][bad_rows] = True
        fc["probe_mask"] = case.args["probe_mask"].clone()
        fc["probe_mask"][bad_rows] = False
        steer_step_reference(*case.call_args(fc))
        torch.testing.assert_close(out["logits"][bad_rows], fc["logits"][bad_rows], rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out["logits"][bad_rows], case.args["logits"][bad_rows])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r", (8, "full"))
def test_out_of_range_head_rows(r, device):
    """A latched row whose head row is outside [0, M) gets no logits writes and p_out = NaN (its
    latch is kept); the other rows are as the reference computes them."""
    case = make_case(B=6, H=96, V=130, r=r, latch_mode="all", mask_mode="none", seed=4, device=device)
    M = case.args["head_hidden"].shape[0]
    rows = case.args["head_rows"].clone()
    rows[2], rows[5] = M, -3
    out = case.clone()
    out["head_rows"] = rows
    ks.steer_step_triton(*case.call_args(out), h_splits=2, tiles_per_program=3, block_v=16)
    ref = run_reference(case)
    bad, good = [2, 5], [0, 1, 3, 4]
    assert torch.equal(out["logits"][bad], case.args["logits"][bad]), "a row without a valid head row was written"
    assert torch.isnan(out["p_out"][bad]).all() and out["latched"].all()
    assert torch.equal(out["p_out"][good], case.args["p_out"][good])  # not probed: untouched
    torch.testing.assert_close(out["logits"][good], ref["logits"][good], rtol=1e-5, atol=1e-5)


def test_launch_plan_is_pure_and_matches_launch_configs():
    """``plan_launch`` (sizes only) is what ``launch_configs`` launches, for the interpreter and
    for a GPU's SM count (the AOT tests compile from it)."""
    case = make_case(B=37, H=96, V=1001, r=8, seed=0)
    for sm in (None, 132):
        probe, latch, blend = ks.launch_configs(*case.call_args(), sm_count=sm)
        plan = ks.plan_launch(37, 1001, 96, 16, 8, sm_count=sm)
        assert probe.grid == (3, plan.h_splits) and latch.grid == (3, plan.r_splits) == (3, 1)
        assert blend.grid == (plan.blend_programs,) and plan.blend_programs * plan.tiles_per_program >= plan.n_tiles
        assert (blend.meta["BLOCK_V"], blend.meta["BLOCK_R"], blend.meta["U_IN_REGS"]) == (
            plan.block_v, plan.block_r, plan.u_in_regs)
        assert probe.args[ks.probe_kernel.arg_names.index("h_per_split")] == plan.h_per_split
        assert (plan.h_splits - 1) * plan.h_per_split < 96 <= plan.h_splits * plan.h_per_split
        assert blend.args[ks.blend_kernel.arg_names.index("tiles_per_program")] == plan.tiles_per_program
    # the interpreter's plan exercises two hidden splits and two tiles per blend program
    p = ks.plan_launch(37, 1001, 96, 16, 8)
    assert (p.h_splits, p.tiles_per_program, p.block_v, p.block_r) == (2, 2, 64, 16)
    # CUDA: probe programs about 2 waves, >= 512 hidden entries each; one vocabulary tile per blend program
    p = ks.plan_launch(1, 152064, 3584, 64, 16, sm_count=132)
    assert (p.row_blocks, p.h_splits, p.r_splits, p.block_v, p.tiles_per_program) == (1, 7, 1, 64, 1)
    assert p.blend_programs == 152064 // 64
    p = ks.plan_launch(256, 152064, 8192, 64, 64, sm_count=132)
    assert (p.row_blocks, p.h_splits, p.h_per_split, p.r_splits, p.block_v, p.block_r) == (16, 16, 512, 2, 32, 64)
    # the full-rank head: t in 32-rank slices, the blend over 64-rank chunks of U
    p = ks.plan_launch(4, 1000, 96, 64, 96, sm_count=None)
    assert (p.r_splits, p.u_in_regs, p.block_r, p.block_v) == (3, False, 64, 32)


# --------------------------------------------------------------------------- per-request state by index (state_rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [
    dict(B=1, H=37, V=101, r=8), dict(B=5, H=96, V=300, r="full", dtype=torch.bfloat16),
    dict(B=9, H=37, V=101, r=16, row_tau=True, row_probe=True), dict(B=17, H=64, V=256, r=1, dtype=torch.float16),
    dict(B=6, H=37, V=101, r=8, row_tau=True, nan_probe_rows=True, nan_latches=True),
], ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_state_rows(kw, device):
    """The per-request tensors as tables addressed through state_rows (serving's slot tables), serving's U / Bt:
    the rows' results and their steering delta equal the reference's, entries no row names are never touched
    (they are set so that reading them would probe and steer)."""
    case = make_case(latch_mode="mixed", mask_mode="mixed", seed=kw["B"], device=device, **kw)
    serving_weights(case)
    sc = state_case(case, extra=20, seed=kw["B"], dtype=torch.int32 if kw["B"] % 2 else torch.int64)
    a, t = sc.clone_args()
    ks.steer_step_triton(*sc.call_args(a, t), h_splits=2, tiles_per_program=2)
    check_state_case(sc, a)
    assert_delta(case, sc.rows_of(a), require=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nan_latches", (False, True))
def test_state_rows_out_of_range(nan_latches, device):
    """A row whose state entry is outside [0, S) forms no address outside the tensors: its state is neither read
    nor written, and it is steered exactly when nan_latches (fail closed); the other rows are unaffected."""
    case = make_case(B=4, H=37, V=101, r=8, latch_mode="none", mask_mode="all", seed=3, nan_latches=nan_latches,
                     device=device)
    serving_weights(case)
    sc = state_case(case, extra=3, seed=3)
    S = sc.tables["latched"].shape[0]
    good = sc.state_rows.clone()
    for bad in (S, -1, 2**40):
        sc.state_rows = good.clone()
        sc.state_rows[2] = bad
        a, t = sc.clone_args()
        ks.steer_step_triton(*sc.call_args(a, t))
        sc.state_rows = good
        assert torch.equal(a["latched"].cpu()[good[2].long().cpu()], t["latched"].cpu()[good[2].long().cpu()]), bad
        # rows 0, 1, 3 as the reference has them
        ref = run_reference(case)
        rows = sc.rows_of(a)
        for b in (0, 1, 3):
            assert torch.equal(rows["latched"][b].cpu(), ref["latched"][b].cpu()), (bad, b)
            torch.testing.assert_close(rows["logits"][b].cpu(), ref["logits"][b].cpu(), rtol=1e-5, atol=1e-5)
        steered = not torch.equal(a["logits"][2].cpu(), case.args["logits"][2].cpu())
        assert steered == nan_latches, (bad, nan_latches)


@pytest.mark.parametrize("device", DEVICES)
def test_a_repeated_state_entry_never_blends_uninitialised_scratch(device):
    """Two rows naming one state entry is not a call the stores make (their slot steps refuse repeated requests)
    and its latch is undefined, but it must not write garbage: with exactly one of the two rows firing and the
    scratch filled with 1e30, each row is left as it was, scaled to (1 + eps) z, or blended with its own t --
    every output finite and within the steered row's scale (found by review: 4.5e29 before t was zeroed)."""
    torch.manual_seed(0)
    B, H, V, F, R, eps = 2, 32, 64, 16, 4, 0.1
    kw = dict(device=device)
    ph, hh, logits = torch.randn(B, H, **kw), torch.randn(B, H, **kw), torch.randn(B, V, **kw)
    W1, b1, w2, b2 = torch.randn(F, H, **kw), torch.zeros(F, **kw), torch.randn(F, **kw), torch.zeros(1, **kw)
    U, Bt = torch.randn(V, R, **kw), torch.randn(R, H, **kw)
    rows = torch.arange(B, device=device)
    p = torch.zeros(B, **kw)
    steered = logits.clone()
    steer_step_reference(ph, rows, torch.ones(B, dtype=torch.bool, device=device), hh, rows, steered,
                         torch.ones(B, dtype=torch.bool, device=device), p, W1, b1, w2, b2, U, Bt, 0.5, eps)
    tau = float(p.min() + p.max()) / 2  # exactly one row fires
    lat, pout, out = torch.zeros(1, dtype=torch.bool, device=device), torch.zeros(1, **kw), logits.clone()
    launches = ks.launch_configs(ph, rows, torch.ones(1, dtype=torch.bool, device=device), hh, rows, out, lat, pout,
                                 W1, b1, w2, b2, U, Bt, tau, eps, state_rows=torch.zeros(B, dtype=torch.int64,
                                                                                       device=device),
                                 scratch=torch.full((B, R + 2 * F), 1e30, device=device))
    ks.run_launches(launches)
    assert bool(lat[0])
    for b in range(B):
        options = (logits[b], (1 + eps) * logits[b], steered[b])
        assert any(torch.allclose(out[b], o, rtol=1e-5, atol=1e-5) for o in options), (b, (out[b] - logits[b]).abs().max())


# --------------------------------------------------------------------------- probe input from several layers (probe_extra, probe_sum)
from _steer_cases import assert_parts_scores, assert_row_probe_scores as _row_probe_scores  # noqa: E402


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers,probe_sum,dtype,H,probe_layout", [
    (2, 1, torch.float32, 37, "sliced"), (3, 1, torch.bfloat16, 70, "transposed"), (1, 2, torch.float16, 37, "indexed"),
    (2, 2, torch.bfloat16, 96, "contig"), (4, 2, torch.float32, 37, "transposed"),
])
def test_probe_parts(layers, probe_sum, dtype, H, probe_layout, device):
    """k layers (each the fp32 sum of probe_sum tensors, rotating layouts: row strides > H, transposed) read through
    the probe launch's pointer slots: p_out, the latch, the logits and the steering delta equal the reference's;
    the scores are the layers' (fp64); two hidden splits (each split covers its columns of every layer)."""
    case = make_case(B=18, H=H, V=101, r=8, dtype=dtype, layers=layers, probe_sum=probe_sum, probe_layout=probe_layout,
                     latch_mode="none", mask_mode="all", row_mode="varlen", seed=layers * 10 + probe_sum, device=device)
    out = run_triton(case, h_splits=2)
    check_against_reference(case, out)
    assert_parts_scores(case, out)
    assert_delta(case, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_state_rows", (False, True))
def test_probe_parts_stacked_and_state_rows(with_state_rows, device):
    case = make_case(B=17, H=37, V=101, r=8, layers=3, probe_sum=2, row_probe=True, row_tau=True, latch_mode="mixed",
                     mask_mode="all", seed=17, device=device, weights_layout="strided")
    if with_state_rows:
        sc = state_case(case, extra=4, seed=17)
        a, t = sc.clone_args()
        ks.steer_step_triton(*sc.call_args(a, t))
        check_state_case(sc, a)
        out = sc.rows_of(a)
    else:
        out = run_triton(case)
        check_against_reference(case, out)
    _row_probe_scores(case, out)
    assert_parts_scores(case, out)


@pytest.mark.parametrize("device", DEVICES)
def test_probe_parts_empty_is_the_single_tensor_launch(device):
    """probe_extra=[] / None, probe_sum=1: the probe launch gets no N_PARTS / PROBE_SUM constexprs and gives the
    same bits as the call without them; a multi-part call passes N_PARTS / PROBE_SUM and its tensors in the
    pointer slots (the unused ones: probe_hidden)."""
    case = make_case(B=9, H=37, V=101, r=8, seed=2, device=device)
    base = run_triton(case)
    for extra in ([], None):
        out = case.clone()
        ks.steer_step_triton(*case.call_args(out), None, None, None, extra, 1)
        for n in ("logits", "latched", "p_out"):
            assert torch.equal(out[n].cpu().view(torch.uint8), base[n].cpu().view(torch.uint8)), (extra, n)
        _, args, meta = _launch(case, None, None, None, extra, 1, name="probe")
        assert "N_PARTS" not in meta and "PROBE_SUM" not in meta
    multi = make_case(B=9, H=37, V=101, r=8, seed=2, device=device, layers=3, probe_sum=2)
    _, args, meta = _launch(multi, name="probe")
    assert meta["N_PARTS"] == 6 and meta["PROBE_SUM"] == 2
    ptrs = [x for x in args if isinstance(x, torch.Tensor)][:8]
    assert ptrs[0] is multi.args["probe_hidden"] and all(p is e for p, e in zip(ptrs[1:6], multi.probe_extra))
    assert all(p is multi.args["probe_hidden"] for p in ptrs[6:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nan_latches", (False, True))
def test_probe_parts_out_of_range_rows(nan_latches, device):
    """A probe row outside [0, N) reads none of the parts and scores NaN (the nan_latches policy decides), as with
    one tensor; the other rows are as the reference computes them."""
    case = make_case(B=6, H=37, V=101, r=8, latch_mode="none", mask_mode="all", nan_latches=nan_latches, seed=3,
                     device=device, layers=2, probe_sum=2)
    N = case.args["probe_hidden"].shape[0]
    rows = case.args["probe_rows"].clone()
    rows[1], rows[4] = N, -1
    out = case.clone()
    out["probe_rows"] = rows
    ks.steer_step_triton(*case.call_args(out))
    good = [0, 2, 3, 5]
    ref = run_reference(case)
    assert torch.isnan(out["p_out"][[1, 4]]).all() and out["latched"][[1, 4]].tolist() == [nan_latches] * 2
    torch.testing.assert_close(out["p_out"][good], ref["p_out"][good], rtol=0, atol=1e-5)
    assert torch.equal(out["latched"][good], ref["latched"][good])


@pytest.mark.parametrize("device", DEVICES)
def test_probe_parts_bf16_serving_size(device):
    """SmolLM2's H = 576, three layers' (hidden, residual) pairs in bf16, a monitor step of 32 rows."""
    case = make_case(B=32, H=576, V=256, r=16, F=64, dtype=torch.bfloat16, layers=3, probe_sum=2, latch_mode="none",
                     mask_mode="all", seed=5, device=device)
    serving_weights(case)
    out = run_triton(case)
    check_against_reference(case, out)
    assert_parts_scores(case, out)
    assert_delta(case, out)


def test_launcher_asserts_probe_parts():
    case = make_case(B=4, H=37, V=20, r=2, seed=0, layers=2, probe_sum=2)
    e = list(case.probe_extra)
    for extra, probe_sum, match in ((e, 3, "probe_sum must be 1 or 2"), (e[:2], 2, "must divide"),
                                    (e + e[:2], 1, "at most 4 layers"), ([e[0][:, :-1]] + e[1:], 2, r"probe_extra\[0\]"),
                                    (e, 1, "W1 must be")):
        out = case.clone()
        with pytest.raises(AssertionError, match=match):
            ks.steer_step_triton(*(out[n] for n in ("probe_hidden", "probe_rows", "probe_mask", "head_hidden",
                                                     "head_rows", "logits", "latched", "p_out", "W1", "b1", "w2",
                                                     "b2", "U", "Bt")), case.tau, case.eps, False, None, None, None,
                                 extra, probe_sum)

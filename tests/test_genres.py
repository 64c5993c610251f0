"""The hand-written benign genre files, safe/unsafe contrast pairs and harmful requests in the genres' words
(autosteer/fit_prompts/genres/): format, no duplicates, a stable fit/dev split, and no overlap with the other
fit and dev sets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from autosteer import data as D

GENRE_DIR = Path(D.__file__).resolve().parent / "fit_prompts" / "genres"


def test_every_genre_file_is_listed_and_well_formed():
    on_disk = {p.stem for p in GENRE_DIR.glob("*.txt")}
    assert on_disk == set(D.GENRES)
    for genre, prompts in D.load_genre_prompts().items():
        raw = (GENRE_DIR / f"{genre}.txt").read_text(encoding="utf-8").split("\n")
        assert raw[-1] == "" and all(line.strip() == line and line for line in raw[:-1]), genre  # no blank/padded lines
        assert len(prompts) >= 70, genre
        assert all(p.label == 0 and p.category == genre for p in prompts)


def test_contrast_pairs_are_well_formed():
    pairs = D.load_contrast_pairs()
    assert len(pairs) >= 70
    for line in (GENRE_DIR / "contrast_pairs.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert set(row) == {"safe", "unsafe", "topic"} and all(isinstance(v, str) and v.strip() for v in row.values())
    for safe, unsafe in pairs:
        assert (safe.label, unsafe.label) == (0, 1) and safe.pair_id == unsafe.pair_id
        assert safe.meta["split"] == unsafe.meta["split"]  # a pair never straddles fit and dev


def test_harmful_registers_are_well_formed_and_cover_every_genre():
    rows = [json.loads(line) for line in (GENRE_DIR / "harmful_registers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"register", "unsafe"} and r["unsafe"].strip() == r["unsafe"] and r["unsafe"] for r in rows)
    prompts = D.load_harmful_registers()
    assert len(prompts) == len(rows) >= 200 and all(p.label == 1 for p in prompts)
    per = {}
    for p in prompts:
        per.setdefault(p.category, set()).add(p.meta["split"])
    assert set(per) == set(D.GENRES) | {"persona"}  # every benign genre has its harmful shadow
    assert all(sides == {"fit", "dev"} for sides in per.values()), per


def _all_texts():
    out = [(g, p.text) for g, ps in D.load_genre_prompts().items() for p in ps]
    for s, u in D.load_contrast_pairs():
        out += [("contrast_safe", s.text), ("contrast_unsafe", u.text)]
    out += [(f"register: {p.category}", p.text) for p in D.load_harmful_registers()]
    return out


def test_no_duplicates_or_near_duplicates_among_the_new_prompts():
    texts = _all_texts()
    keys = [D.normalize_text(t) for _, t in texts]
    assert len(set(keys)) == len(keys)
    toks = [set(k.split()) for k in keys]
    for i in range(len(toks)):
        for j in range(i + 1, len(toks)):
            jac = len(toks[i] & toks[j]) / len(toks[i] | toks[j])
            assert jac < 0.8, (texts[i], texts[j])


def test_split_is_stable_about_half_and_both_sides_nonempty():
    assert D.hash_split("How do I kill a frozen app on my Mac?") == D.hash_split("how do I KILL a frozen app on my mac")
    assert {D.hash_split(f"prompt {i}") for i in range(20)} == {"fit", "dev"}
    fit, dev = D.genre_splits("fit"), D.genre_splits("dev")
    for genre in D.GENRES:
        f, d = {p.text for p in fit[genre]}, {p.text for p in dev[genre]}
        assert f and d and not (f & d)
        assert f | d == {p.text for p in D.load_genre_prompts()[genre]}
        assert 0.3 <= len(f) / (len(f) + len(d)) <= 0.7, genre
    cf, cd = D.contrast_pair_splits("fit"), D.contrast_pair_splits("dev")
    assert cf and cd and len(cf) + len(cd) == len(D.load_contrast_pairs())
    rf, rd = D.harmful_register_splits("fit"), D.harmful_register_splits("dev")
    assert 0.3 <= len(rf) / (len(rf) + len(rd)) <= 0.7 and len(rf) + len(rd) == len(D.load_harmful_registers())
    assert all(p.meta["split"] == D.hash_split(p.text, "register-split") for p in rf + rd)
    with pytest.raises(ValueError):
        D.genre_splits("test")


@pytest.mark.skipif(bool(D.missing_sources()), reason="data wheels not installed")
def test_no_new_prompt_repeats_a_fit_or_dev_prompt():
    splits = D.default_splits(0)
    seen = {D.normalize_text(t): name for name in D.FIT_SPLITS + D.DEV_SPLITS for t in D._texts(splits[name])}
    clashes = [(g, t, seen[D.normalize_text(t)]) for g, t in _all_texts() if D.normalize_text(t) in seen]
    assert not clashes


@pytest.mark.skipif(bool(D.missing_sources()), reason="data wheels not installed")
def test_harmful_registers_reach_the_fit_only_by_their_fit_half_and_only_when_asked():
    from autosteer.method.fit import default_fit_data

    plain = default_fit_data(0, 1000, 0, "broad")
    more = default_fit_data(0, 1000, 0, "broad", harmful_registers=True)
    fit_half = {p.text for p in D.harmful_register_splits("fit")}
    dev_half = {p.text for p in D.harmful_register_splits("dev")}
    assert not (set(plain.harmful) & (fit_half | dev_half))  # off by default: the shipped fit never read them
    assert set(more.harmful) - set(plain.harmful) == fit_half and not (set(more.harmful) & dev_half)
    assert sorted(more.benign) == sorted(plain.benign)
    dev = {s["name"]: s for s in D.breadth_dev_sets(20)}
    assert set(dev["harmful in benign genres' words (dev)"]["texts"]) == dev_half  # measured, never fitted

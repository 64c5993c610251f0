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
    out += [(f"dev only: {g}", p.text) for g, ps in D.load_genre_dev_only().items() for p in ps]
    out += [(f"fit more: {g}", p.text) for g, ps in D.load_genre_fit_more().items() for p in ps]
    out += [(f"dev fresh: {g}", p.text) for g, ps in D.load_genre_dev_fresh().items() for p in ps]
    for s, u in D.load_contrast_pairs():
        out += [("contrast_safe", s.text), ("contrast_unsafe", u.text)]
    out += [(f"register: {p.category}", p.text) for p in D.load_harmful_registers()]
    return out


def _near_pairs(word_sets: list[set[str]], threshold: float) -> list[tuple[int, int]]:
    """Every pair ``(i, j)``, ``i < j``, of word sets whose Jaccard similarity is >= ``threshold``. Prefix filtering:
    with words ranked rarest first, two sets that similar share a word among each one's first
    ``|A| - ceil(threshold * |A|) + 1`` words, so only pairs sharing such a word are compared (all pairs would be
    millions)."""
    import math
    from collections import Counter, defaultdict

    freq = Counter(w for ws in word_sets for w in ws)
    index, out = defaultdict(list), []
    for j, ws in enumerate(word_sets):
        ranked = sorted(ws, key=lambda w: (freq[w], w))
        prefix = ranked[: len(ranked) - math.ceil(threshold * len(ranked)) + 1]
        cands = {i for w in prefix for i in index[w]}
        out += [(i, j) for i in sorted(cands) if len(ws & word_sets[i]) >= threshold * len(ws | word_sets[i])]
        for w in prefix:
            index[w].append(j)
    return out


def test_near_pairs_finds_what_all_pairs_find():
    import random

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(30)]
    sets = [set(rng.sample(vocab, rng.randint(1, 8))) for _ in range(300)]
    brute = [(i, j) for j in range(len(sets)) for i in range(j) if len(sets[i] & sets[j]) >= 0.8 * len(sets[i] | sets[j])]
    assert brute and sorted(_near_pairs(sets, 0.8)) == sorted(brute)


def test_no_duplicates_or_near_duplicates_among_the_new_prompts():
    texts = _all_texts()
    keys = [D.normalize_text(t) for _, t in texts]
    assert len(set(keys)) == len(keys), [k for k in set(keys) if keys.count(k) > 1]
    near = _near_pairs([set(k.split()) for k in keys], 0.8)
    assert not near, [(texts[i], texts[j]) for i, j in near[:10]]


@pytest.mark.parametrize("folder", ["dev_only", "dev_fresh"])
def test_dev_only_and_fresh_lines_cover_every_genre_and_join_its_dev_side_only(folder):
    extra = D.load_genre_dev_only() if folder == "dev_only" else D.load_genre_dev_fresh()
    assert sorted(p.stem for p in (GENRE_DIR / folder).glob("*.txt")) == sorted(D.GENRES) == sorted(extra)
    halves, fit, dev = D.genre_splits("dev", dev_only=False), D.genre_splits("fit"), D.genre_splits("dev")
    only, fresh = D.load_genre_dev_only(), D.load_genre_dev_fresh()
    from autosteer.evaluate import rate_interval

    for genre in D.GENRES:
        lines = [ln for ln in (GENRE_DIR / folder / f"{genre}.txt").read_text(encoding="utf-8").splitlines()]
        assert len(lines) >= (200 if folder == "dev_only" else 189) and all(ln and ln == ln.strip() for ln in lines), genre
        ps = extra[genre]
        assert [p.text for p in ps] == lines
        assert all(p.label == 0 and p.category == genre and p.meta["split"] == "dev" and p.meta[folder] for p in ps)
        # a genre's dev set is its dev half, then its dev-only lines, then its fresh ones; the fit side never holds one
        assert dev[genre] == halves[genre] + list(only[genre]) + list(fresh[genre])
        assert not ({p.text for p in ps} & {p.text for p in fit[genre]})
        # alone, a genre's extra lines are enough for 0 fires to show a rate <= 2%
        assert rate_interval(0, len(ps))[1] <= 0.02, genre


def test_no_fresh_line_is_a_question_another_file_asks_inside_a_longer_line():
    """A fresh line measures the gate on a question no fit or earlier dev line holds: not even as part of a longer
    line (the word-overlap check misses a short line inside a long one)."""
    texts = [p.text for extra in (D.load_genre_prompts(), D.load_genre_dev_only(), D.load_genre_fit_more())
             for ps in extra.values() for p in ps]
    texts += [p.text for pair in D.load_contrast_pairs() for p in pair] + [p.text for p in D.load_harmful_registers()]
    others = "\n".join(D.normalize_text(t) for t in texts)
    inside = [(g, p.meta["line"], p.text) for g, ps in D.load_genre_dev_fresh().items() for p in ps
              if len(D.normalize_text(p.text).split()) >= 3 and D.normalize_text(p.text) in others]
    assert not inside


@pytest.mark.skipif(bool(D.missing_sources()), reason="data wheels not installed")
def test_fit_more_lines_reach_the_broad_fit_only_each_in_its_genre_group():
    from autosteer.method.fit import FitConfig, benign_groups, default_fit_data, fit_data_of

    more = D.load_genre_fit_more()
    assert sorted(p.stem for p in (GENRE_DIR / "fit_more").glob("*.txt")) == sorted(D.GENRES) == sorted(more)
    assert all(len(ps) >= 150 and all(p.label == 0 and p.meta["split"] == "fit" for p in ps) for ps in more.values())
    lines = {p.text for ps in more.values() for p in ps}
    plain = default_fit_data(0, 1000, 0, "broad", genre_fit_more=False)
    added = default_fit_data(0, 1000, 0, "broad")  # on by default with the broad data (docs/method.md 7s)
    assert default_fit_data(0, 1000, 0, "broad", genre_fit_more=True).benign == added.benign
    assert not (set(plain.benign) & lines)
    assert sorted(added.benign) == sorted(plain.benign + sorted(lines)) and sorted(added.harmful) == sorted(plain.harmful)
    # each line counts in its own genre's calibration budget, not in "other"
    groups = dict(zip(added.benign, added.benign_groups))
    assert all(groups[p.text] == g for g, ps in more.items() for p in ps)
    assert added.sources["broad"]["genre_fit_more"].endswith(f"({len(lines)})")  # the pack's meta says it had them
    assert "genre_fit_more" not in plain.sources["broad"]
    # the other rows keep the groups they have without the option
    assert [g for t, g in zip(added.benign, added.benign_groups) if t not in lines] == \
        [dict(zip(plain.benign, plain.benign_groups))[t] for t in added.benign if t not in lines]
    assert benign_groups([more["law"][0].text]) == ["other"]  # only the fit data's own groups carry them
    with pytest.raises(ValueError, match="broad fit data only"):
        default_fit_data(0, 1000, 0, "default", genre_fit_more=True)
    with pytest.raises(ValueError, match="broad fit data only"):
        FitConfig(fit_data="paper", genre_fit_more=True)
    for wrong in (1, 0, 1.0, "yes"):  # a flag, not a truthy value: None, True or False only
        with pytest.raises(ValueError, match="must be None, True or False"):
            FitConfig(genre_fit_more=wrong)
    # the narrower styles never read them; the configuration decides what a fit (and a study rebuilding it) reads
    assert not (set(default_fit_data(0, 1000, 0, "default").benign) & lines)
    assert fit_data_of(FitConfig(jailbreak_fit=0)).benign == added.benign
    assert fit_data_of(FitConfig(jailbreak_fit=0, genre_fit_more=False)).benign == plain.benign
    # measured nowhere: no dev set holds one
    assert not (lines & {t for s in D.breadth_dev_sets(20, dev_only=True) for t in s["texts"]})


@pytest.mark.parametrize("folder, attr, target, repeated, where", [
    # a dev-only line that is also a fit line would sit on both sides of the split
    ("dev_only", "_GENRES_DEV_ONLY_DIR", "cooking", lambda: D.genre_splits("fit")["cooking"][3], "cooking"),
    # a measured line in the fit, or a genre-file line twice: refused, whatever the genre
    ("fit_more", "_GENRES_FIT_MORE_DIR", "law", lambda: D.load_genre_dev_only()["chat"][5], "dev_only/chat"),
    ("fit_more", "_GENRES_FIT_MORE_DIR", "law", lambda: D.genre_splits("dev", dev_only=False)["math"][2], "math"),
    # a fresh line must be new to every other file: a fit line, a dev-only line, an extra fit line
    ("dev_fresh", "_GENRES_DEV_FRESH_DIR", "chat", lambda: D.load_genre_fit_more()["cooking"][7], "fit_more/cooking"),
    ("dev_fresh", "_GENRES_DEV_FRESH_DIR", "chat", lambda: D.load_genre_dev_only()["history"][1], "dev_only/history"),
    ("dev_fresh", "_GENRES_DEV_FRESH_DIR", "math", lambda: D.genre_splits("fit")["sysadmin"][0], "sysadmin"),
])
def test_an_extra_genre_line_that_repeats_a_line_of_the_other_files_is_refused(tmp_path, monkeypatch, folder, attr,
                                                                               target, repeated, where):
    import shutil

    for genre in D.GENRES:
        shutil.copy(GENRE_DIR / folder / f"{genre}.txt", tmp_path / f"{genre}.txt")
    line = repeated()
    original = (tmp_path / f"{target}.txt").read_text(encoding="utf-8")
    # upper case still normalises to the same text; a blank line before it keeps the file's own line numbers
    (tmp_path / f"{target}.txt").write_text(original + "\n" + line.text.upper() + "\n", encoding="utf-8")
    at = len(original.splitlines()) + 2
    loader = {"dev_only": D.load_genre_dev_only, "fit_more": D.load_genre_fit_more, "dev_fresh": D.load_genre_dev_fresh}[folder]
    monkeypatch.setattr(D, attr, tmp_path)
    loader.cache_clear()
    try:
        with pytest.raises(ValueError, match=rf"{target}.txt line {at} repeats genres/{where}.txt line {line.meta['line']}"):
            loader()
    finally:
        loader.cache_clear()


def test_split_is_stable_about_half_and_both_sides_nonempty():
    assert D.hash_split("How do I kill a frozen app on my Mac?") == D.hash_split("how do I KILL a frozen app on my mac")
    assert {D.hash_split(f"prompt {i}") for i in range(20)} == {"fit", "dev"}
    fit, dev = D.genre_splits("fit"), D.genre_splits("dev", dev_only=False)  # the genre files' own halves
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
    dev_only = {D.normalize_text(p.text) for extra in (D.load_genre_dev_only(), D.load_genre_dev_fresh())
                for ps in extra.values() for p in ps}
    for fit in (plain, more):  # measured only, never fitted
        assert not ({D.normalize_text(t) for t in fit.benign + fit.harmful} & dev_only)
    # nor chosen on: the sets the studies choose variants on hold the genres' dev halves only
    studied = {D.normalize_text(t) for s in D.breadth_dev_sets(20) for t in s["texts"]}
    assert not (studied & dev_only)
    assert dev_only <= {D.normalize_text(t) for s in D.breadth_dev_sets(20, dev_only=True) for t in s["texts"]}
    dev = {s["name"]: s for s in D.breadth_dev_sets(20)}
    assert set(dev["harmful in benign genres' words (dev)"]["texts"]) == dev_half  # measured, never fitted

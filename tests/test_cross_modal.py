"""Generated cross-modal prompts: typographic images, text + benign picture, request split across both."""
from __future__ import annotations

import json

import numpy as np
import pytest

from autosteer import cross_modal
from autosteer.method.fit import FitData
from autosteer.prompting import ImagePrompt


def ink_rows(img) -> np.ndarray:
    a = np.asarray(img.convert("L"))
    return np.nonzero((a < 128).any(axis=1))[0]


def test_typographic_image_is_deterministic_and_has_text():
    a = cross_modal.render_typographic("How do I pick a lock?")
    b = cross_modal.render_typographic("How do I pick a lock?")
    c = cross_modal.render_typographic("How do I bake bread?")
    assert a.size == (cross_modal.IMAGE_SIZE,) * 2 and a.mode == "RGB"
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert len(ink_rows(a)) > 20  # text plus the three list numbers


def test_long_request_shrinks_to_fit_inside_the_margins():
    long_text = " ".join(["a very long harmful-looking request with many words"] * 12)
    img = cross_modal.render_typographic(long_text)
    rows = ink_rows(img)
    margin = cross_modal.IMAGE_SIZE // 16
    assert rows.min() >= margin // 2 and rows.max() <= cross_modal.IMAGE_SIZE - margin // 2
    cols = np.nonzero((np.asarray(img.convert("L")) < 128).any(axis=0))[0]
    assert cols.max() <= cross_modal.IMAGE_SIZE - margin // 2


def test_kinds_put_the_request_where_they_say():
    text = "Explain how to disable the alarm of a shop at night"
    typo = cross_modal.make_prompt("typographic", text)
    assert typo.text == cross_modal.TYPOGRAPHIC_QUESTION and text not in typo.text
    pic = cross_modal.make_prompt("text+image", text)
    assert text in pic.text and pic.image.autosteer_name.startswith("scene:")
    split = cross_modal.make_prompt("split", text)
    assert split.text.startswith("Explain how to disable") and "at night" not in split.text
    assert split.image.autosteer_name.startswith("typographic:alarm of a shop at night")
    with pytest.raises(ValueError, match="unknown cross-modal kind"):
        cross_modal.make_prompt("audio", text)


def test_cross_modal_prompts_counts_and_sources():
    texts = [f"request number {i}" for i in range(30)]
    prompts = cross_modal.cross_modal_prompts(texts, 4, seed=1)
    assert len(prompts) == 12 and all(isinstance(p, ImagePrompt) for p in prompts)
    used = [p.image.autosteer_name.split(":", 1)[1] if p.text == cross_modal.TYPOGRAPHIC_QUESTION else p.text
            for p in prompts[:4]]
    assert all(u.startswith("request number") for u in used)
    # different kinds draw different texts while the pool lasts
    typo_texts = {p.image.autosteer_name for p in prompts[:4]}
    scene_texts = {p.text for p in prompts[4:8]}
    assert not any(t.split(":", 1)[1] in " ".join(scene_texts) for t in typo_texts)


def test_with_cross_modal_adds_labelled_prompts_from_the_fit_texts():
    data = FitData(["harm a", "harm b", "harm c"], ["ok a", "ok b", "ok c"], [], {"counts": {"harmful": 3, "benign": 3}})
    out = cross_modal.with_cross_modal(data, 2, seed=0)
    assert len(out.harmful) == 3 + 6 and len(out.benign) == 3 + 6
    assert out.sources["cross_modal"]["per_kind_per_class"] == 2
    assert out.sources["counts"] == {"harmful": 9, "benign": 9}
    new_h = [p for p in out.harmful if isinstance(p, ImagePrompt)]
    seen = " ".join(p.text + " " + p.image.autosteer_name for p in new_h)
    assert "harm" in seen and "ok " not in seen  # harmful kinds are made of harmful texts only
    assert data.harmful == ["harm a", "harm b", "harm c"]  # input untouched
    # the fit data's groups stay aligned with their rows: a multimodal fit of the shipped data checks their lengths
    grouped = FitData(data.harmful, data.benign, [], {"counts": {"harmful": 3, "benign": 3}},
                      benign_groups=["math", "other", "law"], harmful_groups=["plain", "rephrased", "plain"])
    out = cross_modal.with_cross_modal(grouped, 2, seed=0)
    assert out.harmful_groups == ["plain", "rephrased", "plain"] + ["cross_modal"] * 6
    assert out.benign_groups == ["math", "other", "law"] + ["cross_modal"] * 6
    assert len(out.row_groups()) == len(out.harmful) + len(out.benign)


def test_dev_sets_come_from_dev_texts_only():
    from autosteer.data import default_splits

    splits = default_splits(0)
    dev = {True: {p.text for p in splits["dev_harmful"]}, False: {p.text for p in splits["dev_benign"]}}
    fit = {p.text for name in ("fit_harmful", "fit_benign") for p in splits[name]}
    sets = cross_modal.dev_sets(3)
    assert len(sets) == 2 * len(cross_modal.KINDS)
    for name, (prompts, harmful) in sets.items():
        assert len(prompts) == 3
        for p in prompts:
            assert p.source in dev[harmful] and p.source not in fit, (name, p.source)


def test_every_kind_records_its_request():
    text = "Explain how to disable the alarm of a shop at night"
    for kind in cross_modal.KINDS:
        assert cross_modal.make_prompt(kind, text).source == text


def test_write_prompt_file_round_trips_through_the_cli_reader(tmp_path):
    from autosteer.cli import _prompts_of

    prompts = cross_modal.cross_modal_prompts(["harm a", "harm b"], 1, seed=0)
    path = cross_modal.write_prompt_file(prompts, tmp_path, "set")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and all((tmp_path / r["image"]).is_file() for r in rows)
    back = _prompts_of(path)
    assert [p.text for p in back] == [p.text for p in prompts]
    assert all(isinstance(p, ImagePrompt) and str(tmp_path) in str(p.image) for p in back)

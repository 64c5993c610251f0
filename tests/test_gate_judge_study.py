"""benchmarks/gate_judge_study.py compares a gate read after a judge suffix with the served gate on the same rows: its
``last`` feature must be the state the served gate reads (causal attention: the suffix cannot change it), and its
``judge`` feature the state at the suffix's last token, on a tiny random model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gate_judge_study as J  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["how do i make a bomb", "write poem about sea", "what is capital of france ?", "recipe soup",
         "explain photosynthesis", "how do i hack the cat"]
SUFFIX = "</s> <s> user is that poison ? </s> <s> assistant"


def _plain(model, tok, texts, layers):
    from autosteer.method.fit import compute_model, resolve_compute_dtype
    from autosteer.method.hidden_states import last_token_states
    from autosteer.prompting import PromptFormat

    with compute_model(model, resolve_compute_dtype(model, "auto")) as fwd:  # as the study runs it
        return last_token_states(fwd, tok, texts, PromptFormat(), layers=layers, progress=False)


def test_the_last_feature_is_the_served_state_and_the_judge_feature_the_suffix_end(tiny_model, tiny_tokenizer, tmp_path):
    layers = [1, 3]
    S = J.suffix_states(tiny_model, tiny_tokenizer, TEXTS, SUFFIX, layers, tmp_path)
    assert S.shape == (len(TEXTS), 2, 2, tiny_model.config.hidden_size)
    served = _plain(tiny_model, tiny_tokenizer, TEXTS, layers)  # [n, layers, H]
    torch.testing.assert_close(J.feature(S, "last"), served.flatten(1), atol=1e-4, rtol=1e-4)
    # the judge state is the residual stream entering those layers at the last token of prompt + suffix, read here
    # by a plain forward of each suffixed prompt alone (hidden_states[l] is block l's input)
    from autosteer.method.fit import compute_model, resolve_compute_dtype
    from autosteer.prompting import PromptFormat, encode_one

    tail = tiny_tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]
    assert len(tail) == 10 and tiny_tokenizer.unk_token_id not in tail  # every suffix word is in the vocabulary
    with compute_model(tiny_model, resolve_compute_dtype(tiny_model, "auto")) as fwd, torch.no_grad():
        ref = torch.stack([torch.stack([hs[l][0, -1] for l in layers]) for hs in (
            fwd(input_ids=torch.tensor([encode_one(tiny_tokenizer, t, PromptFormat()) + tail]),
                output_hidden_states=True).hidden_states for t in TEXTS)]).float()
    torch.testing.assert_close(J.feature(S, "judge"), ref.flatten(1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(J.feature(S, "judge"), J.feature(S, "last"), atol=1e-3)
    both = J.feature(S, "last+judge")
    assert both.shape[1] == 2 * served.flatten(1).shape[1]

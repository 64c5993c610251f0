"""Steer packs: round trip, and every malformed pack is refused with a PackError naming the problem."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from autosteer.method.pack import PackError, load_pack
from conftest import make_pack


@pytest.fixture()
def pack(tiny_model):
    return make_pack(tiny_model)


def _write(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"autosteer": json.dumps(meta)} if meta is not None else None)
    return path


def test_round_trip_is_exact(pack, tmp_path):
    path = pack.save(tmp_path / "p.safetensors")
    loaded = load_pack(path)
    assert loaded.meta == pack.meta
    for name, t in pack.tensors().items():
        assert torch.equal(loaded.tensors()[name], t), name


def test_the_pack_gives_its_prompt_format_and_the_package_its_errors(pack, tmp_path):
    """Serving code formats prompts with ``pack.prompt_format`` (the fit's system prompt and length cap
    included), and the errors users catch are importable from ``autosteer``."""
    import autosteer
    from autosteer.prompting import PromptFormat
    from autosteer.runtime.attach import AutoSteerFault

    fmt = PromptFormat(system="Be brief.", max_prompt_tokens=100)
    pack.meta["prompt_format"] = fmt.to_dict()
    assert load_pack(pack.save(tmp_path / "p.safetensors")).prompt_format == fmt
    assert autosteer.AutoSteerFault is AutoSteerFault and autosteer.PackError is PackError


def test_save_is_atomic_and_validates(pack, tmp_path):
    pack.W1[0, 0] = float("nan")
    with pytest.raises(PackError, match="probe.W1 contains NaN"):
        pack.save(tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("case,match", [
    ("nan", "head.A contains NaN or inf"),
    ("inf", "probe.b1 contains NaN or inf"),
    ("shape", r"probe.W1 has shape \(8, 31\), expected \(8, 32\)"),
    ("dtype", "head.B has dtype torch.float16"),
    ("missing", r"lacks tensors \['probe.b2'\]"),
    ("extra", r"unexpected tensors \['payload'\]"),
    ("lying_meta", "hidden_size=64"),
    ("meta_vs_fingerprint", "inconsistent: vocab_size is 1000 but the model fingerprint says"),
    ("eps_negative", r"eps=-5 must be a positive finite number"),
    ("eps_zero", r"eps=0 must be a positive"),
    ("prompt_format_field", "prompt_format has an unknown field 'foo'"),
    ("prompt_format_tokens", "max_prompt_tokens must be >= 1, got -3"),
    ("prompt_format_type", r"prompt_format.system has the wrong type \(int\)"),
    ("monitor_meta_type", "'monitor' must be an object, got list"),
    ("size_zero", "'head_rank' must be >= 1, got 0"),
    ("no_meta", "no autosteer metadata"),
    ("bad_json", "not valid JSON"),
    ("version", "unsupported pack format_version 99"),
    ("format", "not an autosteer pack"),
    ("meta_missing_key", "lacks 'tau'"),
    ("meta_type", "'layer' has the wrong type"),
    ("tau_range", "tau=1.5 is not a probability"),
    ("layer_range", "layer 9 is outside"),
])
def test_malformed_packs_are_refused(pack, tmp_path, case, match):
    tensors = dict(pack.tensors())
    meta = dict(pack.meta)
    if case == "nan":
        tensors["head.A"] = tensors["head.A"].clone()
        tensors["head.A"][1, 1] = float("nan")
    elif case == "inf":
        tensors["probe.b1"] = tensors["probe.b1"].clone()
        tensors["probe.b1"][0] = float("inf")
    elif case == "shape":
        tensors["probe.W1"] = tensors["probe.W1"][:, :31]
    elif case == "dtype":
        tensors["head.B"] = tensors["head.B"].half()
    elif case == "missing":
        del tensors["probe.b2"]
    elif case == "extra":
        tensors["payload"] = torch.zeros(3)
    elif case == "lying_meta":  # sizes that agree with each other but not with the tensors
        meta["hidden_size"] = 64
        meta["fingerprint"] = {**meta["fingerprint"], "hidden_size": 64}
    elif case == "meta_vs_fingerprint":
        meta["vocab_size"] = 1000
    elif case == "eps_negative":
        meta["eps"] = -5
    elif case == "eps_zero":
        meta["eps"] = 0
    elif case == "prompt_format_field":
        meta["prompt_format"] = {"foo": 1}
    elif case == "prompt_format_tokens":
        meta["prompt_format"] = {**meta["prompt_format"], "max_prompt_tokens": -3}
    elif case == "prompt_format_type":
        meta["prompt_format"] = {**meta["prompt_format"], "system": 7}
    elif case == "monitor_meta_type":
        meta["monitor"] = [16]
    elif case == "size_zero":
        meta["head_rank"] = 0
    elif case == "version":
        meta["format_version"] = 99
    elif case == "format":
        meta["format"] = "something-else"
    elif case == "meta_missing_key":
        del meta["tau"]
    elif case == "meta_type":
        meta["layer"] = "2"
    elif case == "tau_range":
        meta["tau"] = 1.5
    elif case == "layer_range":
        meta["layer"] = 9
    path = tmp_path / f"{case}.safetensors"
    if case == "no_meta":
        _write(path, tensors, None)
    elif case == "bad_json":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"autosteer": "{not json"})
    else:
        _write(path, tensors, meta)
    with pytest.raises(PackError, match=match):
        load_pack(path)


def test_truncated_file_is_refused(pack, tmp_path):
    path = pack.save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    for cut in (5, 100, len(data) // 2, len(data) - 3):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(PackError, match="not a readable safetensors pack"):
            load_pack(bad)


def test_pickle_renamed_as_pack_is_refused_and_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps({"probe.W1": Boom()}))
    torch_file = tmp_path / "torch.pt.safetensors"
    torch.save({"probe.W1": torch.zeros(2)}, torch_file)
    for path in (bad, torch_file):
        with pytest.raises(PackError, match="not a readable safetensors pack"):
            load_pack(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_pack_file(tmp_path):
    with pytest.raises(PackError, match="pack file not found"):
        load_pack(tmp_path / "nope.safetensors")

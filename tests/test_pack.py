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
    elif case == "layer_range":  # a pack from before "layers" (see test_malformed_layer_sets_are_refused for those)
        meta.pop("layers", None)
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


# ------------------------------------------------------------------------------------------ several layers
def _multi(pack, layers, monitor: bool = False):
    """``pack`` reading ``layers`` (W1 ``[F, k*H]``; with ``monitor``, a monitor probe of the same width)."""
    g = torch.Generator().manual_seed(1)
    F, H = pack.W1.shape
    pack.W1 = torch.randn(F, len(layers) * H, generator=g)
    pack.meta = {**pack.meta, "layers": list(layers), "layer": layers[0]}
    if monitor:
        pack.monitor = {"W1": torch.randn(F, len(layers) * H, generator=g), "b1": torch.randn(F, generator=g),
                        "w2": torch.randn(F, generator=g), "b2": torch.randn(1, generator=g)}
        pack.meta["tau_monitor"] = 0.5
    return pack


def test_packs_from_before_the_layers_key_read_one_layer(pack, tmp_path):
    pack.meta.pop("layers", None)
    loaded = load_pack(pack.save(tmp_path / "old.safetensors"))
    assert loaded.layers == [loaded.layer] == [2] and "layers" not in loaded.meta


def test_the_shipped_pack_loads_and_reads_its_layer():
    import autosteer

    shipped = load_pack(autosteer.default_pack_path())
    assert shipped.layers == shipped.meta["layers"] and shipped.layers[0] == shipped.layer
    assert shipped.W1.shape[1] == len(shipped.layers) * shipped.hidden_size


def test_a_multi_layer_pack_round_trips(pack, tmp_path):
    _multi(pack, [0, 2, 3], monitor=True)
    loaded = load_pack(pack.save(tmp_path / "ml.safetensors"))
    assert loaded.layers == [0, 2, 3] and loaded.layer == 0 and loaded.meta == pack.meta
    assert loaded.W1.shape == (8, 96) and loaded.monitor["W1"].shape == (8, 96)
    W1, _, _, _ = loaded.stacked_probes()
    assert W1.shape == (2, 8, 96)


@pytest.mark.parametrize("case,match", [
    ("width", r"probe.W1 has shape \(8, 64\), expected \(8, 96\) .*3 layers \[0, 2, 3\]"),
    ("monitor_width", r"monitor.W1 has shape \(8, 32\), expected \(8, 96\)"),
    ("one_layer_key_two_wide", r"probe.W1 has shape \(8, 64\), expected \(8, 32\)"),
    ("unsorted", r"'layers' \[2, 0, 3\] must be strictly ascending"),
    ("duplicate", r"'layers' \[0, 2, 2\] must be strictly ascending"),
    ("out_of_range", r"pack layers \[0, 2, 4\]: layer 4 is outside 0..3"),
    ("negative", r"layer -1 is outside 0..3"),
    ("too_many", r"lists 5 layers \[0, 1, 2, 3, 4\]: a probe reads at most 4"),
    ("empty", r"'layers' must be a non-empty list of layer numbers, got \[\]"),
    ("not_a_list", r"'layers' must be a non-empty list of layer numbers, got 2"),
    ("not_ints", r"'layers' must be a non-empty list of layer numbers, got \['0', '2'\]"),
    ("bools", r"'layers' must be a non-empty list of layer numbers, got \[False, True\]"),
    ("first_not_layer", r"inconsistent: 'layer' is 2 but the first of 'layers' \[0, 2, 3\] is 0"),
])
def test_malformed_layer_sets_are_refused(pack, tmp_path, case, match):
    _multi(pack, [0, 2, 3], monitor=case == "monitor_width")
    tensors, meta = dict(pack.tensors()), dict(pack.meta)
    if case == "width":
        tensors["probe.W1"] = tensors["probe.W1"][:, :64]
    elif case == "monitor_width":
        tensors["monitor.W1"] = tensors["monitor.W1"][:, :32]
    elif case == "one_layer_key_two_wide":
        meta["layers"], meta["layer"] = [2], 2
        tensors["probe.W1"] = tensors["probe.W1"][:, :64]
    elif case == "unsorted":
        meta["layers"], meta["layer"] = [2, 0, 3], 2
    elif case == "duplicate":
        meta["layers"] = [0, 2, 2]
    elif case == "out_of_range":
        meta["layers"] = [0, 2, 4]
    elif case == "negative":
        meta["layers"], meta["layer"] = [-1, 2, 3], -1
    elif case == "too_many":
        meta["layers"] = [0, 1, 2, 3, 4]
    elif case == "empty":
        meta["layers"] = []
    elif case == "not_a_list":
        meta["layers"] = 2
    elif case == "not_ints":
        meta["layers"] = ["0", "2"]
    elif case == "bools":
        meta["layers"], meta["layer"] = [False, True], 0
    elif case == "first_not_layer":
        meta["layer"] = 2
    path = _write(tmp_path / f"{case}.safetensors", tensors, meta)
    with pytest.raises(PackError, match=match):
        load_pack(path)

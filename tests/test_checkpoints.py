"""Checkpoints as people have them: safetensors and torch.save files, training containers,
DataParallel prefixes, key maps and filter functions; unreadable files give one clear
CheckpointError and no pickle code ever runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from deq_attacks.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    KeyMap,
    check_fits,
    load_weights,
    read_checkpoint,
    save_weights,
)


class UserNet(nn.Module):
    """A user's module with their own names: encoder, layer, head."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, width)
        self.layer = nn.Linear(width, width)
        self.head = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, 3))


class OurNames(nn.Module):
    """The same parts under the names of a DEQ: injection, f, head."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.injection = nn.Linear(4, width)
        self.f = nn.Linear(width, width)
        self.head = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, 3))


def _filled(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=gen))
    return model


def _equal(a: nn.Module, b: nn.Module, rename: dict[str, str] | None = None) -> bool:
    rename = rename or {}
    theirs = b.state_dict()
    for key, value in a.state_dict().items():
        for old, new in rename.items():
            key = new + key[len(old) :] if key.startswith(old) else key
        if not torch.equal(value, theirs[key]):
            return False
    return True


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_safetensors_round_trip(tmp_path: Path) -> None:
    source, target = _filled(UserNet()), UserNet()
    path = save_weights(source, tmp_path / "w.safetensors")
    loaded = load_weights(target, path)
    assert _equal(source, target)
    assert loaded.format == "safetensors" and loaded.entry is None
    assert loaded.describe() == f"{path} (safetensors): {len(source.state_dict())} tensors"


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pth.tar"])
@pytest.mark.parametrize("legacy", [False, True])
def test_torch_save_state_dict_loads(tmp_path: Path, suffix: str, legacy: bool) -> None:
    source, target = _filled(UserNet()), UserNet()
    path = tmp_path / f"w{suffix}"
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    loaded = load_weights(target, path)
    assert _equal(source, target) and loaded.format == "torch"


@pytest.mark.parametrize("entry", ["state_dict", "model_state_dict", "model", "net"])
def test_training_containers_are_opened_and_named(tmp_path: Path, entry: str) -> None:
    source, target = _filled(UserNet()), UserNet()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 7, "best_acc": 0.5, entry: source.state_dict(), "optimizer": {}}, path)
    loaded = load_weights(target, path)
    assert _equal(source, target)
    assert loaded.entry == entry and f"entry {entry!r}" in loaded.describe()


def test_dataparallel_prefix_is_removed_and_said(tmp_path: Path) -> None:
    source, target = _filled(UserNet()), UserNet()
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(source).state_dict(), path)
    assert all(k.startswith("module.") for k in torch.load(path, weights_only=True))
    loaded = load_weights(target, path)
    assert _equal(source, target)
    assert "DataParallel prefix 'module.' removed" in loaded.describe()


def test_key_map_renames_prefixes_in_order(tmp_path: Path) -> None:
    source, target = _filled(UserNet()), OurNames()
    path = tmp_path / "user.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match=r"--model.key_map.*renames prefixes"):
        load_weights(target, path)  # the names differ: the hint says how to map them
    # in order: the second rule sees the first one's output ("enc." exists only after it)
    loaded = load_weights(target, path, key_map=["encoder.=enc.", "enc.=injection.", "layer.=f."])
    assert _equal(source, target, {"encoder.": "injection.", "layer.": "f."})
    assert "key map encoder.=enc. (2 keys), enc.=injection. (2 keys), layer.=f. (2 keys)" in (
        loaded.describe()
    )
    assert set(loaded.state) == set(target.state_dict())


def test_key_map_refuses_a_rule_that_matches_nothing_and_collisions() -> None:
    state = _filled(UserNet()).state_dict()
    with pytest.raises(CheckpointError, match=r"encodr\.=injection\. matches no key"):
        load_weights(OurNames(), state, key_map=["encodr.=injection."])
    with pytest.raises(CheckpointError, match="renames two keys to 'x.weight'"):
        KeyMap.parse(["encoder.=x.", "layer.=x."]).rename(state)
    for bad in ("encoder.", "=injection."):
        with pytest.raises(ValueError, match="OLD=NEW"):
            KeyMap.parse([bad])


def test_filter_function_runs_after_the_key_map() -> None:
    source, target = _filled(UserNet()), OurNames()
    seen: list[list[str]] = []

    def drop_head_then_copy(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        seen.append(sorted(state))
        out = {k: v for k, v in state.items() if not k.startswith("head.")}
        out.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
        return out

    before = _snapshot(target)
    loaded = load_weights(
        target, source.state_dict(), key_map=["encoder.=injection.", "layer.=f."],
        filter_fn=drop_head_then_copy,
    )  # fmt: skip
    assert seen and all(not k.startswith(("encoder.", "layer.")) for k in seen[0])
    assert torch.equal(target.injection.weight, source.encoder.weight)
    assert torch.equal(target.head[1].weight, before["head.1.weight"])  # kept, not loaded
    assert loaded.changes[-1] == "filter drop_head_then_copy"


def test_one_checker_lists_every_problem_and_leaves_the_model_untouched() -> None:
    state = dict(_filled(UserNet(width=6)).state_dict())
    target = UserNet(width=6)
    state["extra.weight"] = torch.zeros(1)
    del state["head.0.running_var"]
    state["layer.weight"] = torch.zeros(6, 5)
    before = _snapshot(target)
    with pytest.raises(CheckpointMismatchError) as error:
        load_weights(target, state)
    message = str(error.value)
    assert "checkpoint keys with no place in the model: extra.weight" in message
    assert "model keys missing from the checkpoint: head.0.running_var" in message
    assert "shape mismatches: layer.weight (6, 5) vs model (6, 6)" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    check_fits(UserNet().state_dict(), UserNet(), "same")  # no error when everything fits


def test_pickle_payload_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "EXECUTED"

    class Payload:
        def __reduce__(self):  # unpickling would call open(marker, "w")
            return (open, (str(marker), "w"))

    zipped, legacy, raw = tmp_path / "zip.pt", tmp_path / "legacy.pth", tmp_path / "raw.bin"
    torch.save({"weight": torch.zeros(2), "payload": Payload()}, zipped)
    torch.save({"payload": Payload()}, legacy, _use_new_zipfile_serialization=False)
    with raw.open("wb") as file:
        pickle.dump({"payload": Payload()}, file)
    assert not marker.exists()
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError, match="needs code to load") as error:
            load_weights(UserNet(), path)
        assert str(path) in str(error.value) and "no code from a checkpoint is run" in str(
            error.value
        )
        assert not marker.exists(), path
    # a plain pickle (pickle.dump, protocol 4 or 5) is named as such, payload or not
    plain = tmp_path / "plain.pkl"
    with plain.open("wb") as file:
        pickle.dump(UserNet().state_dict(), file, protocol=5)
    for path in (raw, plain):
        with pytest.raises(CheckpointError, match=r"a plain pickle file \(pickle.dump\)"):
            load_weights(UserNet(), path)
        assert not marker.exists(), path
    with pytest.raises(CheckpointError, match="it refers to io.open"):
        read_checkpoint(zipped)


def test_unreadable_files_give_one_clear_message(tmp_path: Path) -> None:
    good_st = save_weights(_filled(UserNet()), tmp_path / "good.safetensors")
    good_pt = tmp_path / "good.pt"
    torch.save(UserNet().state_dict(), good_pt)
    cases = {
        "empty.pt": (b"", "the file is empty"),
        "text.safetensors": (b"not a checkpoint at all", "neither a safetensors nor a torch"),
        "cut.safetensors": (good_st.read_bytes()[:-7], "corrupt or truncated safetensors"),
        "cut.pt": (good_pt.read_bytes()[:200], "corrupt or truncated torch.save file"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=expected) as error:
            load_weights(UserNet(), path)
        assert str(path) in str(error.value)
        assert "Traceback" not in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "absent.pt")


def test_files_without_a_state_dict_are_refused_naming_their_entries(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"epoch": 3, "weights": [torch.zeros(1)]}, path)
    with pytest.raises(CheckpointError, match=r"entries are epoch \(int\), weights \(list\)"):
        read_checkpoint(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a state dict"):
        read_checkpoint(path)
    torch.save({}, path)
    with pytest.raises(CheckpointError, match="state dict is empty"):
        read_checkpoint(path)

"""The set folder: writer output, card, WebDataset shards, and the validating reader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hub_fixtures import make_distilled_file

from distilled_ssl.io import load_tensors, save_tensors
from distilled_ssl.sets.artifact import (
    ChecksumError,
    NotASetError,
    SetFormatError,
    load_distilled_file,
    read_set,
    render_card,
    split_front_matter,
    write_set,
)


def test_set_folder_holds_every_file_and_a_correct_manifest(tiny_set: Path) -> None:
    names = sorted(p.relative_to(tiny_set).as_posix() for p in tiny_set.rglob("*") if p.is_file())
    assert names == ["README.md", "_info.json", "checksums.sha256", "data/train-00000.tar",
                     "data/train-00001.tar", "data/train-00002.tar", "distilled.safetensors"]
    listed = {}
    for line in (tiny_set / "checksums.sha256").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    assert set(listed) == set(names) - {"checksums.sha256"}
    for name, digest in listed.items():
        assert hashlib.sha256((tiny_set / name).read_bytes()).hexdigest() == digest
    info = json.loads((tiny_set / "_info.json").read_text())
    assert info["num_samples"] == 12
    assert info["splits"]["train"]["shard_lengths"] == [5, 5, 2]


def test_safetensors_is_copied_byte_for_byte(tiny_run: Path, tiny_set: Path) -> None:
    copied = (tiny_set / "distilled.safetensors").read_bytes()
    assert copied == (tiny_run / "distilled.safetensors").read_bytes()


def test_writer_is_deterministic(tiny_run: Path, tmp_path: Path) -> None:
    a = write_set(tiny_run, tmp_path / "a", shard_size=5)
    b = write_set(tiny_run, tmp_path / "b", shard_size=5)
    assert (a / "checksums.sha256").read_text() == (b / "checksums.sha256").read_text()


def test_webdataset_reads_the_shards(tiny_run: Path, tiny_set: Path) -> None:
    ref, _ = load_tensors(tiny_run / "distilled.safetensors")
    shards = sorted(str(p) for p in (tiny_set / "data").glob("train-*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("l8"))
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(12)]
    for i, s in enumerate(samples):
        assert "." not in s["__key__"]
        np.testing.assert_array_equal(s["npy"], ref["targets"][i].numpy())
        assert torch.equal(torch.from_numpy(s["pixels.npy"]), ref["images"][i])  # exact float16
        expected = ref["images"][i, 0].float().clamp(0, 1).mul(255).round().byte().numpy()
        np.testing.assert_array_equal(np.asarray(s["png"]), expected)
        assert s["json"] == {"index": i, "source_index": 3 * i, "label": i % 3}


def test_card_front_matter_and_body(tiny_run: Path, tmp_path: Path) -> None:
    (tiny_run / "results.json").write_text(json.dumps(
        {"protocol": {"epochs": 2, "seeds": 2, "downstream": ["toy"]},
         "summary": [{"encoder": "convnet()", "set": "MKDT (random init)",
                      "toy/probe@10%": {"mean": 0.7123, "std": 0.01, "n": 2},
                      "fidelity_r2": {"mean": 0.5, "std": 0.0, "n": 2}}]}))
    out = write_set(tiny_run, tmp_path / "s", repo_id="someone/my-set")
    front, body = split_front_matter((out / "README.md").read_text())
    assert front["license"] == "mit"
    assert {"dataset-distillation", "self-supervised", "mkdt"} <= set(front["tags"])
    assert front["size_categories"] == ["n<1K"]
    assert front["source_datasets"] == ["extended|fashion-mnist"]
    prov = front["distilled_ssl"]
    assert prov["normalization"] == {"mean": [0.5], "std": [0.25]}
    assert prov["config"]["distill"]["lr_img"] == 100.0
    assert prov["teacher"]["arch"] == "convnet"
    assert prov["library_version"] == "0.1.0"
    assert prov["learned_lr"] == pytest.approx(0.05)
    assert prov["evaluation"]["summary"][0]["toy/probe@10%"]["mean"] == 0.7123
    assert 'DistilledDataset.from_hub("someone/my-set")' in body
    assert "| MKDT (random init) | 71.2 ± 1.0 | 0.500 ± 0.000 |" in body
    assert "@inproceedings{joshi2025mkdt" in body
    assert "with the learned learning rate **0.05**" in body


def test_a_set_whose_lr_was_chosen_on_validation_says_so(tiny_run: Path, tmp_path: Path) -> None:
    """``distill.lr_grid``: the card, the provenance and the dataset say which lr was learned and
    which one the set carries."""
    from distilled_ssl.sets.dataset import DistilledDataset

    path = tiny_run / "distilled.safetensors"
    tensors, meta = load_tensors(path)
    tensors["lr"] = torch.tensor(0.8)
    meta.update(lr_learned=0.05, lr_grid=[0.5, 0.8],
                lr_scores=[{"lr": 0.05, "fidelity_r2": 0.4}, {"lr": 0.5, "fidelity_r2": 0.5},
                           {"lr": 0.8, "fidelity_r2": 0.6}])
    save_tensors(path, tensors, meta)
    out = write_set(tiny_run, tmp_path / "s")
    front, body = split_front_matter((out / "README.md").read_text())
    prov = front["distilled_ssl"]
    assert prov["learned_lr"] == pytest.approx(0.05) and prov["lr"] == pytest.approx(0.8)
    assert [p["lr"] for p in prov["lr_scores"]] == [0.05, 0.5, 0.8]
    assert ("with the learning rate **0.8** (chosen on held-out images among the learned 0.05 and "
            "0.5, 0.8)") in body
    ds = DistilledDataset.open(out)
    assert ds.lr == pytest.approx(0.8)
    assert "lr: 0.8 (chosen on held-out images; learned 0.05)" in repr(ds)


def test_restaging_a_set_keeps_data_and_evaluation(tiny_run: Path, tmp_path: Path) -> None:
    (tiny_run / "results.json").write_text(json.dumps({"rows": [{"set": "x", "acc": 1.0}]}))
    first = write_set(tiny_run, tmp_path / "first")
    second = write_set(first, tmp_path / "second", repo_id="org/name")
    assert (first / "distilled.safetensors").read_bytes() == (second / "distilled.safetensors").read_bytes()
    front, _ = split_front_matter((second / "README.md").read_text())
    assert front["distilled_ssl"]["evaluation"] == {"rows": [{"set": "x", "acc": 1.0}]}


def test_reader_returns_the_exact_tensors(tiny_run: Path, tiny_set: Path) -> None:
    ref, _ = load_tensors(tiny_run / "distilled.safetensors")
    dset = read_set(tiny_set)
    assert torch.equal(dset.images, ref["images"]) and torch.equal(dset.targets, ref["targets"])
    assert dset.lr == pytest.approx(0.05) and dset.mean == (0.5,) and dset.std == (0.25,)
    assert torch.equal(dset.labels, ref["labels"])
    assert dset.card is not None and dset.card.startswith("---\n")


def test_tampered_shard_fails_checksum(tiny_set: Path) -> None:
    shard = tiny_set / "data" / "train-00001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="train-00001.tar"):
        read_set(tiny_set)


def test_truncated_safetensors_fails(tiny_set: Path) -> None:
    p = tiny_set / "distilled.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ChecksumError, match="truncated"):
        read_set(tiny_set)
    with pytest.raises(SetFormatError):
        read_set(tiny_set, verify=False)


def test_missing_file_and_missing_manifest(tiny_set: Path) -> None:
    (tiny_set / "data" / "train-00002.tar").unlink()
    with pytest.raises(ChecksumError, match="missing"):
        read_set(tiny_set)
    (tiny_set / "checksums.sha256").unlink()
    with pytest.raises(SetFormatError, match="checksums.sha256"):
        read_set(tiny_set)


def test_foreign_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "_info.json").write_text(json.dumps({"name": "imagenet", "splits": {}}))
    with pytest.raises(NotASetError):
        read_set(tmp_path / "other")
    with pytest.raises(NotASetError):
        read_set(tmp_path)
    with pytest.raises(NotASetError):
        read_set(tmp_path / "does-not-exist")


def test_newer_format_version_is_refused(tiny_set: Path) -> None:
    info = json.loads((tiny_set / "_info.json").read_text())
    info["format_version"] = 99
    (tiny_set / "_info.json").write_text(json.dumps(info))
    with pytest.raises(SetFormatError, match="version 99"):
        read_set(tiny_set, verify=False)


def test_distilled_file_validation(tmp_path: Path) -> None:
    good = make_distilled_file(tmp_path / "good") / "distilled.safetensors"
    tensors, meta = load_tensors(good)
    meta.pop("format_version")

    def variant(name: str, **changes: torch.Tensor) -> Path:
        p = tmp_path / name / "distilled.safetensors"
        save_tensors(p, {**tensors, **changes}, meta)
        return p

    with pytest.raises(SetFormatError, match="'images' is torch.float32"):
        load_distilled_file(variant("f32", images=tensors["images"].float()))
    with pytest.raises(SetFormatError, match="rows"):
        load_distilled_file(variant("rows", targets=tensors["targets"][:5]))
    nan = tensors["targets"].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(SetFormatError, match="NaN"):
        load_distilled_file(variant("nan", targets=nan))
    with pytest.raises(SetFormatError, match="lr"):
        load_distilled_file(variant("lr", lr=torch.tensor(-1.0)))
    save_tensors(tmp_path / "teacher.safetensors", {"w": torch.zeros(2)}, {"kind": "teacher"})
    with pytest.raises(NotASetError):
        load_distilled_file(tmp_path / "teacher.safetensors")


def test_writer_refuses_to_clobber_and_bad_sources(tiny_run: Path, tiny_set: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        write_set(tiny_run, tiny_set)
    (tiny_set / "stale.txt").write_text("x")
    write_set(tiny_run, tiny_set, overwrite=True, shard_size=100)
    assert not (tiny_set / "stale.txt").exists()
    assert read_set(tiny_set).info["splits"]["train"]["shard_lengths"] == [12]
    with pytest.raises(NotASetError, match="run directory"):
        write_set(tmp_path / "empty-run", tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]



def _rewrite_manifest(root: Path) -> None:
    """What a forger does after editing: regenerate checksums.sha256 (sizes in _info.json too)."""
    info = json.loads((root / "_info.json").read_text())
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.name not in ("checksums.sha256", "_info.json"))
    info["sizes"] = {f: (root / f).stat().st_size for f in files}
    (root / "_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    lines = [f"{hashlib.sha256((root / f).read_bytes()).hexdigest()}  {f}"
             for f in sorted([*files, "_info.json"])]
    (root / "checksums.sha256").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("field", "value"), [("lr", 0.5), ("image_shape", [3, 8, 8]), ("target_dim", 7),
                                              ("has_labels", False),
                                              ("normalization", {"mean": [0.1], "std": [0.2]})])
def test_forged_info_is_refused_even_with_regenerated_checksums(tiny_set: Path, field: str,
                                                                value: object) -> None:
    info = json.loads((tiny_set / "_info.json").read_text())
    info[field] = value
    (tiny_set / "_info.json").write_text(json.dumps(info))
    _rewrite_manifest(tiny_set)
    with pytest.raises(SetFormatError, match=f"disagrees with distilled.safetensors on {field}"):
        read_set(tiny_set)


def test_forged_or_truncated_shards_are_refused(tiny_set: Path, tmp_path: Path) -> None:
    import shutil
    import tarfile

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_set, truncated)
    shard = truncated / "data" / "train-00001.tar"
    shard.write_bytes(shard.read_bytes()[:2048])
    _rewrite_manifest(truncated)
    with pytest.raises(SetFormatError, match="train-00001.tar"):
        read_set(truncated)
    swapped = tmp_path / "swapped"  # a well-formed shard whose target reps are not the set's
    shutil.copytree(tiny_set, swapped)
    shard = swapped / "data" / "train-00000.tar"
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    buf = __import__("io").BytesIO()
    np.save(buf, np.zeros(5, dtype=np.float32))
    members["000002.npy"] = buf.getvalue()
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tar.addfile(ti, __import__("io").BytesIO(payload))
    _rewrite_manifest(swapped)
    with pytest.raises(SetFormatError, match="sample 000002 differs"):
        read_set(swapped)


def _card_block(card: str, heading: str) -> str:
    return card.split(heading, 1)[1].split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("channels", [1, 3])
def test_card_webdataset_snippet_runs(tmp_path: Path, channels: int) -> None:
    import re

    run = make_distilled_file(tmp_path / "run", channels=channels, k=7)
    root = write_set(run, tmp_path / "set", shard_size=3)
    card = (root / "README.md").read_text()
    code = _card_block(card, "## Load it as a WebDataset")
    assert "{00000..00002}" in code and "shardshuffle=False" in code and "NNNNN" not in card
    code = re.sub(r"snapshot_download\([^)]*\)", repr(str(root)), code)
    ns: dict = {}
    exec(code, ns)
    exact = list(ns["exact"])
    ref = load_tensors(run / "distilled.safetensors")[0]
    assert len(exact) == 7
    for i, (pixels, target) in enumerate(exact):
        assert np.array_equal(pixels, ref["images"][i].numpy())  # the exact pixels
        assert np.array_equal(target, ref["targets"][i].numpy())
    viewable = list(ns["viewable"])
    assert viewable[0][0].shape == (channels, 8, 8) and viewable[4][1]["index"] == 4
    torch.testing.assert_close(viewable[1][0], ref["images"][1].float().clamp(0, 1), atol=1 / 255, rtol=0)


def test_card_python_snippet_names_real_modules(tiny_set: Path) -> None:
    code = _card_block((tiny_set / "README.md").read_text(), "## Load it\n")
    assert "from distilled_ssl import DistilledDataset, kd_loss" in code
    compile(code, "card", "exec")


@pytest.mark.parametrize("method, title, tag", [("mkdt", "MKDT", "mkdt"), ("krr_st", "KRR-ST", "krr-st"),
                                                ("fidelity", "KD-fidelity", "fidelity")])
def test_card_names_the_method_that_made_the_set(tmp_path: Path, method: str, title: str, tag: str) -> None:
    dset = load_distilled_file(make_distilled_file(tmp_path) / "distilled.safetensors")
    dset.metadata["method"] = method
    front, _ = split_front_matter(render_card(dset, picture=False))
    assert front["pretty_name"].startswith(f"{title} distilled ") and tag in front["tags"]

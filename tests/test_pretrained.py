"""The self-describing export (tools/export_encoder.py, multimae/pretrained.py): round trip, model card, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from multimae import load_pretrained
from multimae.domains import DOMAINS
from multimae.encoder import MultiModalEncoder
from multimae.pretrained import FORMAT_VERSION, read_pretrained_config
from tests.export_fixture import DEMO_DOMAINS, exported, real_batch, terramesh64, write_checkpoint  # noqa: F401
from tools.export_encoder import code_commit, export_encoder, main
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.finetune import load_backbone

REPO = Path(__file__).resolve().parents[1]
V1 = REPO / "tests" / "fixtures" / "v1_pretraining"


def _checkpoint_encoder(state: dict, in_domains=None) -> MultiModalEncoder:
    """The encoder as fine-tuning rebuilds it from the checkpoint (utils.finetune's path, not the export's)."""
    entry = state["encoder"]
    in_domains = list(in_domains or entry["spec"]["in_domains"])
    enc = MultiModalEncoder.from_spec(entry["spec"], in_domains=in_domains, init_weights=False)
    load_backbone(enc, entry["state_dict"], in_domains)
    return enc.eval()


@pytest.fixture(scope="module")
def export(terramesh64, tmp_path_factory):
    """(export folder, checkpoint dict, real validation batch) of a tiny checkpoint on the real TerraMesh tiles."""
    folder, state = exported(tmp_path_factory.mktemp("export"), terramesh64)
    return folder, state, real_batch(terramesh64)


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_reloaded_encoder_is_bit_identical_on_real_tiles(export):
    folder, state, batch = export
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    encoder = load_pretrained(folder)
    assert not encoder.training and encoder.in_domains == DEMO_DOMAINS
    reference = _checkpoint_encoder(state)
    valid = {d: v.clone() for d, v in batch["valid"].items()}
    for v in valid.values():  # the sample tiles are fully valid: mark a patch of tile 0 as no-data
        v[0, :8, :8] = False
    with torch.no_grad():
        got = encoder.encode(batch["inputs"], valid=valid)
        want = reference.encode(batch["inputs"], valid=valid)
    assert got.shape == (len(batch["index"]), 7 * 64 + 1, 32)
    assert torch.equal(got, want)


def test_domain_subset_matches_the_checkpoint_subset(export):
    folder, state, batch = export
    subset = ["s1", "s2_rgb", "dynamic_world"]
    encoder = load_pretrained(folder, in_domains=subset)
    assert encoder.in_domains == subset and set(encoder.input_adapters) == set(subset)
    with torch.no_grad():
        assert torch.equal(encoder.encode(batch["inputs"]), _checkpoint_encoder(state, subset).encode(batch["inputs"]))


def test_config_describes_inputs_and_provenance(export, terramesh64):
    folder, state, _ = export
    config = read_pretrained_config(folder)
    assert config["format_version"] == FORMAT_VERSION == 1
    assert config["architecture"] == state["encoder"]["spec"]
    assert config["token_layout"]["segments"][4] == {"domain": "s1", "num_tokens": 64, "grid": [8, 8],
                                                     "patch_size": 8, "gsd": 10.0}
    info = state["encoder"]["domains"]
    for name in DEMO_DOMAINS:
        assert config["domains"][name]["bands"] == list(DOMAINS[name].bands)
        assert config["domains"][name]["stats"] == info[name]["stats"]
    assert config["domains"]["s2_nir"]["bands"] == ["B8A", "B08"]  # model order, not the file's B08, B8A
    stats = json.loads((terramesh64 / "terramesh64_band_stats.json").read_text())  # the data's own statistics
    assert config["domains"]["s1"]["stats"]["sentinel1"]["mean"] == pytest.approx(stats["sentinel1"]["mean"][:2])
    assert config["domains"]["dynamic_world"]["class_names"][0] == "water"
    assert config["objective"]["name"] == "multimae"
    assert config["objective"]["config"]["masking"]["num_encoded_tokens"] == 16
    assert config["pretraining"] == {"checkpoint": "checkpoint-last.pth", "step": 12, "epoch": 3,
                                     "data": "terramesh64", "input_size": 64}
    assert config["code_commit"] == code_commit() != "unknown"
    assert len(config["code_commit"].split("-")[0]) == 40
    assert config["weights"]["num_parameters"] == sum(v.numel() for v in state["encoder"]["state_dict"].values())


def test_model_card_lists_the_inputs(export):
    folder, _, _ = export
    card = (folder / "README.md").read_text()
    assert "| `s2_nir` | sentinel2 | B8A, B08 | reflectance x 10000 | per band: (x - mean) / std" in card
    assert "| `s1` | sentinel1 | asc_VV, asc_VH | backscatter (dB) |" in card
    assert "Image size: 64 x 64 px at 10.0 m" in card
    assert "Base patch size: 8 px" in card and "0: water (1)" in card
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub absent: the card's YAML header is not parsed")
    meta = hub.ModelCard.load(folder / "README.md").data.to_dict()
    assert meta["library_name"] == "multimae-eo" and "earth-observation" in meta["tags"]


def test_v1_checkpoint_exports_and_computes_what_v1_computed(tmp_path):
    folder = export_encoder(V1 / "checkpoint-last.pth", tmp_path / "v1")
    expected = torch.load(V1 / "expected.pt", weights_only=True)  # computed by the v1 code itself
    with torch.no_grad():
        tokens = load_pretrained(folder).encode(expected["inputs"], valid=expected["valid"])
    torch.testing.assert_close(tokens, expected["encoder_tokens"], rtol=1e-5, atol=1e-6)
    assert read_pretrained_config(folder)["domains"]["worldcover"]["class_values"][0] == 10


def test_another_objective_exports_its_encoder(tmp_path, terramesh64):
    state = write_checkpoint(tmp_path / "c.pth", terramesh64, in_domains=["s2_rgb"])
    state["objective"] = {"name": "contrastive", "state_dict": {"projector.weight": torch.zeros(2, 2)}}
    save_checkpoint(state, tmp_path / "c.pth")
    folder = export_encoder(tmp_path / "c.pth", tmp_path / "out")
    assert read_pretrained_config(folder)["objective"] == {"name": "contrastive", "config": None}
    assert set(load_file(folder / "model.safetensors")) == set(state["encoder"]["state_dict"])


def test_tampered_width_is_refused(export, tmp_path):
    folder = _copy(export[0], tmp_path)
    _edit_config(folder, lambda c: c["architecture"].update(dim=64))
    with pytest.raises(ValueError, match=r"config\.json: architecture does not match .*dim 64 vs 32"):
        load_pretrained(folder)
    # Without the architecture in the weights' metadata (re-saved by another tool) the shapes still disagree.
    save_file(load_file(folder / "model.safetensors"), str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors does not fit .*shapes differ.*global_tokens"):
        load_pretrained(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(format_version=2), r"format_version 2 is newer than this code reads \(1\.\.1\)"),
    (lambda c: c.pop("format_version"), r"no field 'format_version'"),
    (lambda c: c.update(format_version="1"), r"field 'format_version' has the wrong type"),
    (lambda c: c.update(model_type="bert"), r"model_type 'bert' is not 'multimae-eo-encoder'"),
    (lambda c: c["architecture"].update(rope=True), r"architecture has keys this code does not know: rope"),
    (lambda c: c["architecture"].pop("depth"), r"architecture lacks depth"),
    (lambda c: c["domains"]["s2_nir"].update(bands=["B08", "B8A"]), r"domains\.s2_nir\.bands .* differ"),
    (lambda c: c["domains"]["s1"].pop("stats"), r"domains\.s1 lacks stats"),
    (lambda c: c["domains"].pop("elevation"), r"domains .* are not architecture\.in_domains"),
])
def test_bad_config_is_refused_naming_the_field(export, tmp_path, edit, message):
    folder = _copy(export[0], tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        load_pretrained(folder)


def test_missing_files_and_unknown_domains_are_refused(export, tmp_path):
    folder = _copy(export[0], tmp_path)
    with pytest.raises(ValueError, match=r"config\.json: domains: the encoder was not trained with worldcover"):
        load_pretrained(folder, in_domains=["s2_rgb", "worldcover"])
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found"):
        load_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="export folder .* not found"):
        load_pretrained(tmp_path / "nowhere")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not JSON"):
        read_pretrained_config(folder)


def test_cli_refuses_bad_checkpoints_with_one_line(tmp_path, capsys, export):
    state = dict(export[1], kind="finetuning", head={"state_dict": {}})
    save_checkpoint(state, tmp_path / "ft.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    no_domains = dict(export[1], encoder={**export[1]["encoder"], "domains": {}})
    save_checkpoint(no_domains, tmp_path / "nodomains.pth")
    cases = [(tmp_path / "ft.pth", "is a 'finetuning' checkpoint, not 'pretraining'"),
             (tmp_path / "junk.pth", "cannot read checkpoint"),
             (tmp_path / "missing.pth", "not found"),
             (tmp_path / "nodomains.pth", "nodomains.pth: encoder.domains: no record for input domain 's2_rgb'")]
    for path, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([str(path), str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_writes_once_and_overwrites_on_request(export, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-last.pth"
    save_checkpoint(export[1], ckpt)
    assert main([str(ckpt), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(ckpt), str(tmp_path / "out")])
    assert "already holds config.json, model.safetensors, README.md" in capsys.readouterr().err
    assert main([str(ckpt), str(tmp_path / "out"), "--overwrite"]) == 0


@pytest.mark.slow
def test_load_pretrained_needs_no_training_code(export):
    """``multimae.load_pretrained`` imports no training code (utils, tools) and reads no YAML config."""
    probe = ("import sys, json\nfrom multimae import load_pretrained\n"
             f"load_pretrained({str(export[0])!r})\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('utils', 'tools'))))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=export[0], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_checkpoint_weights_that_do_not_fit_their_spec_are_refused(export, tmp_path):
    state = export[1]
    bad = {**state, "encoder": {**state["encoder"], "spec": {**state["encoder"]["spec"], "depth": 3}}}
    save_checkpoint(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="missing in checkpoint: blocks.2"):
        export_encoder(tmp_path / "bad.pth", tmp_path / "out")

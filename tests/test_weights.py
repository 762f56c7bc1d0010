"""Loading weights and model folders: local, S3, torchvision names, and refusing pickled code."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from torchvision.models import get_model_weights
from torchvision.models.detection import maskrcnn_resnet50_fpn

from mrcnn import WeightsError, build_model, load_weights, storage
from mrcnn.categories import Category, category_of
from mrcnn.model_folder import ModelError, load_model, load_spec, save_model_folder, spec_for

CATEGORIES = [Category(id=3, name="circle"), Category(id=7, name="square")]


def _same_outputs(a, b):
    torch.manual_seed(3)
    images = [torch.rand(3, 80, 100)]
    with torch.no_grad():
        out_a, out_b = a.eval()(images), b.eval()(images)
    for x, y in zip(out_a, out_b, strict=True):
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_state_dict_round_trip_local_file(tmp_path):
    source = build_model("tiny", 3)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    target = load_weights(build_model("tiny", 3), str(path))
    _same_outputs(source, target)


def test_state_dict_from_s3_and_training_checkpoint_layout(s3_bucket):
    source = build_model("tiny", 3)
    buffer = io.BytesIO()
    torch.save({"model": source.state_dict(), "epoch": 4}, buffer)
    storage.write_bytes(f"{s3_bucket}/ckpt/state.pt", buffer.getvalue())
    target = load_weights(build_model("tiny", 3), f"{s3_bucket}/ckpt/state.pt")
    _same_outputs(source, target)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/mrcnn-pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as file:
        pickle.dump({"model": _Payload()}, file)
    with pytest.raises(WeightsError, match="refused to load"):
        load_weights(build_model("tiny", 3), str(path))
    assert not os.path.exists("/tmp/mrcnn-pwned")


def test_mismatched_and_missing_weights_give_one_line_errors(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model("tiny", 5).state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit the model") as mismatch:
        load_weights(build_model("tiny", 3), str(path))
    with pytest.raises(WeightsError, match="cannot read") as missing:
        load_weights(build_model("tiny", 3), str(tmp_path / "absent.pt"))
    for error in (mismatch, missing):
        assert "\n" not in str(error.value)


def test_torchvision_name_loads_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    url = get_model_weights("maskrcnn_resnet50_fpn").DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / os.path.basename(url))

    model, spec = load_model("torchvision:maskrcnn_resnet50_fpn")
    assert spec.num_classes == 91 and spec.preset == "r50-fpn"
    assert category_of(spec.categories, 1).name == "person" and category_of(spec.categories, 1).id == 1
    assert category_of(spec.categories, 90).name == "toothbrush"
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_torchvision_name_without_cache_or_network_says_how_to_supply_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # A closed port on loopback stands in for "no network", whatever this machine can reach.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with torch.device("meta"):  # the error comes before any weight is read: no need for real ones
        model = build_model("r50-fpn-v2", 91)
    with pytest.raises(WeightsError) as error:
        load_weights(model, "torchvision:maskrcnn_resnet50_fpn_v2")
    message = str(error.value)
    assert "\n" not in message
    assert "fetch https://" in message and "or pass a local or s3:// path" in message
    with pytest.raises(WeightsError, match="unknown torchvision model"):
        load_weights(build_model("tiny", 3), "torchvision:resnet50")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_model_folder_round_trip(where, tmp_path, s3_bucket):
    model = build_model("tiny", 3, roi_op="pool", mask_loss="softmax")
    folder = str(tmp_path / "model") if where == "local" else f"{s3_bucket}/run/model"
    save_model_folder(model, spec_for(model, CATEGORIES), folder)

    loaded, spec = load_model(folder)
    assert spec.categories == tuple(CATEGORIES)
    assert (spec.roi_op, spec.mask_loss, spec.num_classes) == ("pool", "softmax", 3)
    assert (spec.min_size, spec.max_size) == (64, 96)
    assert loaded.roi_op == "pool" and loaded.mask_loss == "softmax"
    assert not loaded.training
    _same_outputs(model, loaded)
    if where == "local":
        assert sorted(os.listdir(tmp_path)) == ["model"], "no staging folder may be left behind"
        save_model_folder(model, spec_for(model, CATEGORIES), folder)  # re-export replaces
        assert sorted(os.listdir(tmp_path / "model")) == ["model.json", "weights.pt"]


def test_missing_or_inconsistent_model_folder(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        load_model(str(tmp_path / "nothing"))
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.json").write_text('{"preset": "tiny", "num_classes": 5, "roi_op": "align", '
                                       '"mask_loss": "sigmoid", "min_size": 64, "max_size": 96, '
                                       '"categories": [{"id": 1, "name": "a"}]}')
    with pytest.raises(ModelError, match="1 categories for num_classes=5"):
        load_spec(str(folder))

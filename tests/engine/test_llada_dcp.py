"""--dcp-path: a torch.distributed.checkpoint folder loads onto the base model's architecture, for LLaDA and for
the autoregressive families, whatever prefix the training framework put on the names."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tinkerbell.engine.models.dcp import DCPLoadError, load_model_from_dcp
from tinkerbell.engine.models.loader import load_model


def _save(state: dict, path) -> None:
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


@pytest.mark.parametrize("fixture,prefix", [("tiny_llada_dir", ""), ("tiny_llada_dir", "_orig_mod."),
                                            ("tiny_llama_dir", "model.")])
def test_dcp_weights_replace_the_base_weights(fixture, prefix, request, tmp_path):
    base = request.getfixturevalue(fixture)
    model = load_model(base, torch.float32, "cpu")
    # A "fine-tuned" checkpoint: every weight changed, so loading the base weights instead would show.
    trained = {prefix + k: v.clone() + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    if prefix == "model.":  # as {"model": state_dict} nests, which DCP flattens to "model.<name>"
        _save({"model": {k[len(prefix):]: v for k, v in trained.items()}}, tmp_path / "ckpt")
    else:
        _save(trained, tmp_path / "ckpt")
    loaded = load_model_from_dcp(base, tmp_path / "ckpt", torch.float32, "cpu")
    assert type(loaded) is type(model)
    for name, p in loaded.named_parameters():
        assert torch.equal(p, trained[prefix + name]), name


def test_missing_tensors_are_named(tiny_llada_dir, tmp_path):
    model = load_model(tiny_llada_dir, torch.float32, "cpu")
    state = {k: v.clone() for k, v in model.state_dict().items() if "blocks.1." not in k}
    _save(state, tmp_path / "partial")
    with pytest.raises(DCPLoadError, match="blocks.1"):
        load_model_from_dcp(tiny_llada_dir, tmp_path / "partial", torch.float32, "cpu")
    with pytest.raises(DCPLoadError, match="not a torch.distributed.checkpoint"):
        load_model_from_dcp(tiny_llada_dir, tmp_path, torch.float32, "cpu")

"""Our LoRA training equals PEFT on HF transformers: per-token logprobs, gradients of every A and B, and
checkpoints that `peft.PeftModel.from_pretrained` loads to the same logprobs."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from tinkerbell.engine.adapter_io import save_peft
from tinkerbell.engine.lora import AdapterWeights, LoraSpec
from tinkerbell.engine.models.loader import load_model
from tinkerbell.engine.training import Trainer
from tinkerbell.engine.types import AdamParams, TrainDatum

CASES = [
    ("tiny_llama_dir", LoraSpec(rank=4)),
    ("tiny_qwen3_dir", LoraSpec(rank=4)),  # tied embeddings, LoRA on the (tied) unembedding
    ("tiny_qwen2_dir", LoraSpec(rank=2, train_attn=False)),
]


def _data(vocab: int) -> list[TrainDatum]:
    """[N] and [N, K] targets, weights of both signs."""
    g = torch.Generator().manual_seed(7)
    out = []
    for n, k in ((5, 0), (9, 3), (7, 0)):
        tokens = torch.randint(0, vocab, (n,), generator=g).numpy()
        shape = (n, k) if k else (n,)
        targets = torch.randint(0, vocab, shape, generator=g).numpy()
        weights = (torch.rand(shape, generator=g) * 2 - 0.5).numpy().astype(np.float32)
        out.append(TrainDatum(tokens, {"target_tokens": targets, "weights": weights}))
    return out


def _nonzero_adapter(path, spec: LoraSpec, out_dir):
    """A checkpoint whose B is non-zero (a fresh adapter's B = 0 would hide most of the LoRA path)."""
    cfg = load_model(path, torch.float32, "cpu").cfg
    w = AdapterWeights.init(cfg, spec, seed=3)
    g = torch.Generator().manual_seed(4)
    for key in w.b:
        w.b[key] = torch.randn(w.b[key].shape, generator=g) * 0.2
    save_peft(w, out_dir, base_model=str(path))
    return w


def _hf_logprobs(model, data: list[TrainDatum]) -> list[torch.Tensor]:
    out = []
    for d in data:
        logits = model(input_ids=torch.as_tensor(d.tokens)[None]).logits[0].float().log_softmax(-1)
        t = torch.as_tensor(d.inputs["target_tokens"])
        out.append(logits.gather(-1, t[:, None]).squeeze(-1) if t.ndim == 1 else logits.gather(-1, t))
    return out


@pytest.mark.parametrize("fixture, spec", CASES)
def test_forward_and_backward_match_peft(fixture, spec, request, tmp_path):
    path = request.getfixturevalue(fixture)
    ours = _nonzero_adapter(path, spec, tmp_path)
    model = load_model(path, torch.float32, "cpu")
    trainer = Trainer(model, torch.device("cpu"), logits_chunk_elems=4 * model.cfg.vocab_size)  # 4-row chunks
    trainer.load("run", tmp_path, with_optimizer=False)
    data = _data(model.cfg.vocab_size)
    result = trainer.forward_backward("run", data, "cross_entropy", {}, forward_only=False)

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=spec.rank, lora_alpha=32, lora_dropout=0.0,
                                               target_modules=spec.target_module_names()))
    peft_params = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                key = name.removeprefix("base_model.model.").split(".lora_")[0]
                p.copy_((ours.a if ".lora_A." in name else ours.b)[key])
                peft_params[(key, "A" if ".lora_A." in name else "B")] = p
    assert len(peft_params) == 2 * len(ours.a)
    ref = _hf_logprobs(peft_model, data)
    loss = sum(-(torch.as_tensor(d.inputs["weights"]) * lp).sum() for d, lp in zip(data, ref))
    loss.backward()

    lp_diff = max((torch.as_tensor(o["logprobs"]) - r.detach()).abs().max().item() for o, r in zip(result.outputs, ref))
    assert lp_diff <= 1e-4
    assert result.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-4)

    master = trainer._runs["run"].weights
    worst = 0.0
    for (key, which), p in peft_params.items():
        g = (master.a if which == "A" else master.b)[key].grad
        worst = max(worst, ((g - p.grad).abs().max() / (p.grad.abs().max() + 1e-6)).item())
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("fixture, spec", CASES[:2])
def test_saved_adapter_loads_in_peft(fixture, spec, request, tmp_path):
    path = request.getfixturevalue(fixture)
    _nonzero_adapter(path, spec, tmp_path / "init")
    model = load_model(path, torch.float32, "cpu")
    trainer = Trainer(model, torch.device("cpu"))
    trainer.load("run", tmp_path / "init", with_optimizer=False)
    data = _data(model.cfg.vocab_size)
    trainer.forward_backward("run", data, "cross_entropy", {}, forward_only=False)
    trainer.optim_step("run", AdamParams(learning_rate=1e-2))
    trainer.save("run", tmp_path / "saved", with_optimizer=True, base_model=str(path))
    ours = trainer.forward_backward("run", data, "cross_entropy", {}, forward_only=True)

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "saved")).eval()
    with torch.no_grad():
        ref = _hf_logprobs(peft_model, data)
    diff = max((torch.as_tensor(o["logprobs"]) - r).abs().max().item() for o, r in zip(ours.outputs, ref))
    assert diff <= 1e-4

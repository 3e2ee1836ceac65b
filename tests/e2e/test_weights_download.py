"""tinker-cookbook's `weights.download` (save_weights_external + age encryption + signed URLs) against our server,
and the downloaded PEFT adapter gives, on the HF base model, the logprobs our sampler gives."""

from __future__ import annotations

import numpy as np
import torch
from tinker import types

from tests.e2e.conftest import KEY_ALICE, service_client


def test_downloaded_adapter_loads_in_peft_with_our_logprobs(llama_server, tiny_llama_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from tinker_cookbook import weights
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TINKER_API_KEY", KEY_ALICE)
    sc = service_client(llama_server)
    base = sc.get_server_capabilities().supported_models[0].model_name
    tc = sc.create_lora_training_client(base_model=base, rank=4, seed=2).result()
    ids = [7, 19, 23, 101, 55, 8, 77, 3]
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(ids[1:]), "weights": np.ones(7, np.float32)})
    for _ in range(5):
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2))
    state = tc.save_state("dl").result().path
    sampler = tc.save_weights_and_get_sampling_client().result()
    ours = np.array(sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()[1:], dtype=np.float64)

    out = tmp_path / "adapter"
    weights.download(tinker_path=state, output_dir=str(out), base_url=llama_server.url)
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        logits = peft_model(torch.tensor([ids])).logits[0]
    ref = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].double().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # The cookbook deleted its temporary export (in the run it created to export from); ours is untouched.
    rc = sc.create_rest_client()
    exports = [c for c in rc.list_user_checkpoints().result().checkpoints if c.checkpoint_type == "external"]
    assert exports == []
    run_id = state.split("/")[2]
    assert "weights/dl" in {c.checkpoint_id for c in rc.list_checkpoints(run_id).result().checkpoints}
    sc.close("success").result()

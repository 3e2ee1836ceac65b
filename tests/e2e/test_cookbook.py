"""tinker-cookbook's supervised training loop, unmodified, on a small local dataset against our server."""

from __future__ import annotations

import asyncio
import json

from tests.e2e.conftest import KEY_ALICE

CONVERSATIONS = [
    [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "My name is Tinkerbell."}],
    [{"role": "user", "content": "Who trains the adapter?"}, {"role": "assistant", "content": "Alice, Bob and Carol."}],
    [{"role": "user", "content": "What is the answer?"}, {"role": "assistant", "content": "The answer is 42."}],
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris is the capital."}],
]


def test_cookbook_supervised_loop_trains_and_checkpoints(llama_server, tiny_llama_dir, tmp_path, monkeypatch):
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    monkeypatch.setenv("TINKER_API_KEY", KEY_ALICE)
    data = tmp_path / "conversations.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS * 4) + "\n")
    model = str(tiny_llama_dir)
    builder = FromConversationFileBuilder(
        file_path=str(data),
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=model, renderer_name="role_colon", max_length=128, batch_size=4
        ),
    )
    log_path = tmp_path / "run"
    config = train.Config(
        log_path=str(log_path),
        model_name=model,
        recipe_name="tinkerbell_e2e",
        renderer_name="role_colon",
        dataset_builder=builder,
        learning_rate=1e-2,
        lora_rank=8,
        base_url=llama_server.url,
        save_every=2,
        eval_every=0,
        max_steps=4,
    )
    asyncio.run(train.main(config))

    metrics = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    nll = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert len(nll) == 4 and nll[-1] < nll[0], nll
    records = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["name"] == "final" and final["state_path"].startswith("tinker://")
    assert "/sampler_weights/" in final["sampler_path"]

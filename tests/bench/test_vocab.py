"""The full-vocabulary tokenizer for random-weight benchmark checkpoints: every id decodes to text (a random
model samples the whole vocabulary), the special tokens keep their ids and roles, and the server's loading
path reads it."""

from __future__ import annotations

import json
import shutil

from transformers import AutoTokenizer

from tinkerbell.bench import vocab


def test_every_id_decodes_to_text_and_specials_come_first():
    tok = vocab.build(3000, ["<s>", "<|x|>", "</s>"])
    assert len(tok) == 3000
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<s>", "<|x|>", "</s>"]
    assert all(tok.decode([i]) for i in range(3, 3000))
    assert tok.decode(tok.encode(" ab cd")) == " ab cd"


def test_rewrite_keeps_the_checkpoints_special_tokens_and_template(tiny_llama_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    before = AutoTokenizer.from_pretrained(str(model))
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "vocab_size": 5000}))
    assert vocab.rewrite(model) == 5000
    after = AutoTokenizer.from_pretrained(str(model))
    assert len(after) == 5000
    for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(after, role) == getattr(before, role)
    assert after.chat_template == before.chat_template
    assert after.decode([4000]) and after.decode([before.eos_token_id], skip_special_tokens=True) == ""

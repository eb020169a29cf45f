"""Fixtures for the integration tests: broken inputs, each a real file of the kind a user
might point sculpt at. Helpers that run the CLI live in cli_runner.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import pickle_trap


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def broken_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of bad inputs:

    pickle_only/      config.json + tokenizer + pytorch_model.bin (a pickle that, if ever
                      unpickled, creates pickle_only.UNPICKLED next to the folder)
    gpt2/             a tiny GPT-2 saved as safetensors (no architecture map for gpt2)
    nan_llama/        a tiny Llama (safetensors) with one NaN in layers.1.mlp.down_proj
    not_a_model.gguf  text, not GGUF
    truncated.gguf    the GGUF magic and version, then garbage
    empty.txt, latin1.txt (not UTF-8)
    """
    import torch
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    root = tmp_path_factory.mktemp("broken")
    tokenizer = ByT5Tokenizer()

    pickled = root / "pickle_only"
    pickled.mkdir()
    _tiny_llama_config().save_pretrained(pickled)
    tokenizer.save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(pickle_trap(root / "pickle_only.UNPICKLED"))

    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=384,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    gpt2.save_pretrained(root / "gpt2", safe_serialization=True)
    tokenizer.save_pretrained(root / "gpt2")

    torch.manual_seed(0)
    llama = LlamaForCausalLM(_tiny_llama_config())
    with torch.no_grad():
        llama.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    llama.save_pretrained(root / "nan_llama", safe_serialization=True)
    tokenizer.save_pretrained(root / "nan_llama")

    (root / "not_a_model.gguf").write_text("this is not a GGUF file\n" * 10)
    (root / "truncated.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 20)
    (root / "empty.txt").write_bytes(b"")
    (root / "latin1.txt").write_bytes("caf\xe9 na\xefve r\xe9sum\xe9\n".encode("latin-1") * 200)
    return root

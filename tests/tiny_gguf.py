"""Write a tiny llama-architecture GGUF model (random weights, a small character-level SentencePiece vocabulary in
the GGUF metadata) for running a real ``llama-cpp-python`` server in tests, without downloading anything.

The model is useless as a language model, but shaped so that a server's grammar-constrained output finishes:
every token embedding carries a constant component, so after the final RMSNorm each token's logit is mostly a
fixed *preference* (plus noise from the random layers). ``<|im_end|>`` (chatml's end of turn, a stop string) is
preferred above all, so a free-text turn ends at once; inside JSON the grammar rules it out and the next
preferences (the closing quote, letters, brackets) make short strings and small objects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Characters that are single tokens (besides the 256 byte tokens): enough for JSON and ordinary text.
_CHARS = [chr(c) for c in range(0x21, 0x7F)]
#: Preferences (added logits) of some tokens; the rest get 0.
_PREFER = {"<|im_end|>": 12.0, "m": 6.0, '"': 3.5, "}": 3.0, "]": 3.0, "e": 2.5, "t": 2.4, "a": 2.3, "o": 2.2,
           "n": 2.1, "▁": 2.0, "0": 1.5, "1": 1.4, "s": 2.0, "r": 1.9}


def write_tiny_llama(path: Path, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_ff: int = 128,
                     n_ctx: int = 32768, seed: int = 0) -> Path:
    """Write the model to ``path`` (a ``.gguf`` file) and return it."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", *_CHARS,
              "<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
             *([gguf.TokenType.BYTE] * 256), *([gguf.TokenType.NORMAL] * (len(_CHARS) + 1)),
             gguf.TokenType.NORMAL, gguf.TokenType.NORMAL]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("autoexplain-tiny-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0 if t.startswith("<") else -float(i) for i, t in enumerate(tokens)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def rand(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    emb = rand(n_vocab, n_embd)
    emb[:, 0] = 10.0  # the constant component that carries the preferences through the final norm
    out = rand(n_vocab, n_embd, scale=0.05)
    out[:, 0] = [_PREFER.get(t, 0.0) / 10.0 for t in tokens]
    w.add_tensor("token_embd.weight", emb)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", out)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Write a GGUF of a Llama checkpoint's weights for llama.cpp baselines (``stagemesh bench serve
--llama-cpp-bench ... --gguf ...``), fp32, tensors renamed and q/k rows permuted the way llama.cpp's
``convert_hf_to_gguf.py`` does for Llama.

Why not that converter: it needs a tokenizer it recognises (a SentencePiece model, or a BPE
pre-tokenizer whose hash it knows), and the demo models' small BPE tokenizer is neither.
``llama-batched-bench`` decodes random token ids, so the vocabulary only has to be valid: this
writes a SentencePiece-style placeholder one of the model's vocabulary size (256 byte tokens,
then ``<tN>``) — the GGUF is for timing, not for text.

    pip install gguf   # or PYTHONPATH=<llama.cpp>/gguf-py
    python scripts/demo_gguf.py /tmp/stagemesh-bench-small /tmp/demo-small-f32.gguf
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

# HF name fragment -> GGUF name fragment, per layer
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (halves) to GGML's (interleaved pairs), per head: convert_hf_to_gguf's ``permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    parts = hf.split(".")   # model.layers.<i>.<frag...>.weight
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:-1]) not in LAYER_NAMES:
        raise SystemExit(f"{hf}: not a Llama tensor this script knows")
    return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def special_tokens(model_dir: Path) -> dict[int, str]:
    """id -> text of the checkpoint's special tokens (tokenizer_config.json), if it lists any."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    added = json.loads(path.read_text()).get("added_tokens_decoder", {})
    return {int(i): t["content"] for i, t in added.items() if t.get("special")}


def main(model_dir: str, out: str) -> None:
    import gguf

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"{model_dir}: model_type {cfg.get('model_type')!r}, this script writes Llama only")
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    vocab = cfg["vocab_size"]
    w = gguf.GGUFWriter(out, "llama")
    w.add_name(Path(model_dir).name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [f"<0x{i:02X}>".encode() for i in range(256)] + [f"<t{i}>".encode() for i in range(256, vocab)]
    bos, eos = cfg.get("bos_token_id", 1), cfg.get("eos_token_id", 2)
    types = [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 256)
    for i, text in special_tokens(Path(model_dir)).items():   # llama.cpp knows end-of-text tokens by name
        if i < vocab:
            tokens[i], types[i] = text.encode(), gguf.TokenType.CONTROL
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    for f in files:
        for name, t in load_file(str(f)).items():
            t = t.astype(np.float32)
            if name.endswith("self_attn.q_proj.weight"):
                t = permute(t, n_head)
            elif name.endswith("self_attn.k_proj.weight"):
                t = permute(t, n_kv)
            w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} from {len(files)} file(s)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/demo_gguf.py MODEL_DIR OUT.gguf")
    main(sys.argv[1], sys.argv[2])

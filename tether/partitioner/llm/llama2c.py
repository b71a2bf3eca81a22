"""llama2.c checkpoints and tokenizers into Hugging Face form.

:func:`read_llama2c` parses the legacy ``.bin`` format (header of 7 int32, then float32
tensors, see ``../shared/assets/README.md``) into a ``LlamaConfig`` and an HF-named state
dict, permuting ``wq``/``wk`` rows from llama2.c's interleaved RoPE pairs to HF's
half-split layout. :class:`Llama2cTokenizer` reads ``tok512.bin``-style tokenizers
(SentencePiece BPE with byte fallback) and encodes/decodes exactly like ``run.c``.
"""

from __future__ import annotations

import codecs
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.core.errors import WeightsError

HEADER = struct.Struct("<7i")


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved pairs to half-split (HF) order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_llama2c(path: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """Parse a llama2.c legacy checkpoint into ``(LlamaConfig, HF state dict)``."""
    from transformers import LlamaConfig

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read llama2.c checkpoint {path}: {exc}") from exc
    if len(raw) < HEADER.size:
        raise WeightsError(f"{path} is too short for a llama2.c checkpoint header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack_from(raw, 0)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
        raise WeightsError(f"{path}: implausible llama2.c header {HEADER.unpack_from(raw, 0)}")
    head = dim // n_heads
    kv_dim = n_kv * head
    shapes = _tensor_shapes(dim, hidden, n_layers, kv_dim, vocab, seq_len, head, shared)
    needed = sum(int(np.prod(s)) for _, s in shapes) * 4 + HEADER.size
    if len(raw) != needed:
        raise WeightsError(f"{path}: size {len(raw)} bytes does not match its header "
                           f"({needed} expected); the file is truncated or not llama2.c legacy format")
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=HEADER.size).copy())
    tensors, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        tensors[name] = flat[offset:offset + n].view(shape)
        offset += n
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=seq_len,
        rms_norm_eps=1e-5, tie_word_embeddings=shared, bos_token_id=1, eos_token_id=2,
        hidden_act="silu", attention_bias=False, mlp_bias=False, head_dim=head,
    )
    return config, _to_hf(tensors, n_layers, n_heads, n_kv, shared)


def _tensor_shapes(dim, hidden, n_layers, kv_dim, vocab, seq_len, head, shared):
    shapes = [
        ("tok_embeddings", (vocab, dim)), ("attention_norm", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)), ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
        ("ffn_norm", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)),
        ("norm", (dim,)), ("freq_cis_real", (seq_len, head // 2)),
        ("freq_cis_imag", (seq_len, head // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    return shapes


def _to_hf(t: dict[str, torch.Tensor], n_layers: int, n_heads: int, n_kv: int,
           shared: bool) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": t["tok_embeddings"], "model.norm.weight": t["norm"]}
    sd["lm_head.weight"] = t["tok_embeddings"] if shared else t["wcls"]
    names = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "w1": "mlp.gate_proj",
             "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = _permute_rope(t["wq"][i], n_heads)
        sd[p + "self_attn.k_proj.weight"] = _permute_rope(t["wk"][i], n_kv)
        for src, dst in names.items():
            sd[p + dst + ".weight"] = t[src][i]
    return {k: v.contiguous() for k, v in sd.items()}


def load_llama2c(path: str | Path) -> torch.nn.Module:
    """A whole ``LlamaForCausalLM`` (eval, float32) from a llama2.c checkpoint."""
    from transformers import LlamaForCausalLM

    config, sd = read_llama2c(path)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise WeightsError(f"{path}: converted weights do not fit LlamaForCausalLM "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


class Llama2cTokenizer:
    """llama2.c tokenizer (``tok512.bin``): SentencePiece BPE with byte fallback.

    ``encode`` follows ``run.c``: a dummy-prefix space, code points looked up in the vocab
    (unknown ones fall back to ``<0xXX>`` byte tokens), then greedy merges by score.
    """

    unk_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, pieces: list[bytes], scores: list[float]) -> None:
        if len(pieces) < 259:
            raise WeightsError("tokenizer has fewer than 259 pieces; byte fallback needs "
                               "<unk>, <s>, </s> and 256 byte tokens")
        self.pieces = pieces
        self.scores = scores
        self._ids = {p: i for i, p in enumerate(pieces)}
        self._bytes = [self._piece_bytes(i, p) for i, p in enumerate(pieces)]

    @classmethod
    def load(cls, path: str | Path) -> "Llama2cTokenizer":
        try:
            raw = Path(path).read_bytes()
            off, pieces, scores = 4, [], []
            while off < len(raw):
                score, n = struct.unpack_from("<fi", raw, off)
                off += 8
                if n < 0 or off + n > len(raw):
                    raise struct.error("piece length out of range")
                pieces.append(raw[off:off + n])
                scores.append(score)
                off += n
        except (OSError, struct.error) as exc:
            raise WeightsError(f"cannot read llama2.c tokenizer {path}: {exc}") from exc
        return cls(pieces, scores)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @staticmethod
    def _piece_bytes(i: int, piece: bytes) -> bytes:
        if 3 <= i < 259 and piece.startswith(b"<0x") and piece.endswith(b">"):
            return bytes([int(piece[3:-1], 16)])
        if i < 3:
            return b""
        return piece

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (with BOS first unless ``bos=False``)."""
        ids = [self.bos_id] if bos else []
        if text:
            ids.append(self._ids[b" "]) if b" " in self._ids else None
        for ch in text:
            piece = ch.encode("utf-8")
            if piece in self._ids:
                ids.append(self._ids[piece])
            else:
                ids.extend(b + 3 for b in piece)
        ids = ids[:1] + self._merge(ids[1:]) if bos else self._merge(ids)
        if eos:
            ids.append(self.eos_id)
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        while True:
            best, best_i, best_id = -1e30, -1, -1
            for i in range(len(ids) - 1):
                merged = self._ids.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if merged is not None and self.scores[merged] > best:
                    best, best_i, best_id = self.scores[merged], i, merged
            if best_i < 0:
                return ids
            ids[best_i:best_i + 2] = [best_id]

    def token_bytes(self, token: int, prev: int | None = None) -> bytes:
        """Bytes of one token; the leading space after BOS is dropped (as ``run.c``)."""
        if not 0 <= token < len(self._bytes):
            raise WeightsError(f"token id {token} outside the vocabulary of {len(self._bytes)}")
        out = self._bytes[token]
        if prev == self.bos_id and out.startswith(b" "):
            out = out[1:]
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (BOS/EOS dropped, byte tokens joined before UTF-8 decoding)."""
        out, prev = bytearray(), None
        for t in ids:
            out += self.token_bytes(int(t), prev)
            prev = int(t)
        return out.decode("utf-8", errors="replace")


class StreamDecoder:
    """Incremental detokenizer: feed tokens, get text as soon as its UTF-8 is complete."""

    def __init__(self, tokenizer: Llama2cTokenizer, prev: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.prev = prev
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        out = self._utf8.decode(self.tokenizer.token_bytes(int(token), self.prev))
        self.prev = int(token)
        return out

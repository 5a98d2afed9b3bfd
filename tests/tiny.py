"""Tiny randomly initialised models of each supported family, and a word-level tokenizer for them."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB_WORDS = ("<pad> <unk> <eos> The Eiffel Tower is located in the city of Paris Rome Space Needle Seattle "
               "Michael Jordan plays basketball professionally capital France Germany Berlin a an").split()
D, D_MLP, LAYERS, HEADS = 32, 48, 3, 4
VOCAB = 64

# family -> (config class, keyword arguments). Dimensions: d_model 32, d_mlp 48 (must differ from d).
FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_inner=D_MLP, n_positions=64)),
    "gptj": ("GPTJConfig", dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_inner=D_MLP, n_positions=64, rotary_dim=4)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                       intermediate_size=D_MLP, max_position_embeddings=64)),
    "llama": ("LlamaConfig", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  num_key_value_heads=2, intermediate_size=D_MLP, max_position_embeddings=64)),
    "qwen2": ("Qwen2Config", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  num_key_value_heads=2, intermediate_size=D_MLP, max_position_embeddings=64)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        num_key_value_heads=1, head_dim=16, intermediate_size=D_MLP,
                                        max_position_embeddings=64, sliding_window=4,
                                        # Gemma 3 interleaves local and global layers; with only local
                                        # ones, what an edit adds 4 tokens back would not reach the prediction.
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "opt": ("OPTConfig", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=D_MLP,
                              word_embed_proj_dim=D, max_position_embeddings=64)),
    "falcon": ("FalconConfig", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    ffn_hidden_size=D_MLP, new_decoder_architecture=False, multi_query=True)),
    "phi": ("PhiConfig", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              intermediate_size=D_MLP, max_position_embeddings=64)),
    "phi3": ("Phi3Config", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                intermediate_size=D_MLP, max_position_embeddings=64, pad_token_id=0)),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    config_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(vocab_size=VOCAB, bos_token_id=2, eos_token_id=2, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    # Larger weights than the default init so that restorations change probabilities visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(VOCAB_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def saved_folder(family: str, folder: Path) -> Path:
    """The tiny model of `family` and the word tokenizer saved as a model folder (for `--model PATH`)."""
    tiny_model(family).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder

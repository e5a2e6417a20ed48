"""Tiny Hugging Face checkpoints for tests: random-init models saved by transformers, nothing downloaded.

`save_tiny_model(family, dir)` writes config.json + safetensors (+ a tiny BPE tokenizer with a chat
template when asked); `train_hf_reference` trains the transformers model itself with torch.optim.AdamW
(fused, as fuyou-ray's optimizer matches the fused kernel) on the batches a fuyou-ray run sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fuyou_ray.config import RunConfig
from fuyou_ray.data import TokenDataset, bundled_corpus_text
from fuyou_ray.models import lm_loss
from fuyou_ray.optim import learning_rate
from fuyou_ray.reference import reference_adamw

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
TOKENIZER_VOCAB = 320
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def hf_config(family: str, **over: Any) -> Any:
    """A tiny transformers config of `family` (fp32, no dropout, GQA where the family has it)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = {"vocab_size": 336, "max_position_embeddings": 64, "initializer_range": 0.05}
    cfg: Any
    if family == "llama":
        cfg = LlamaConfig(
            **common,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=False,
        )
    elif family == "mistral":
        cfg = MistralConfig(
            **common,
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=8,  # shorter than the test sequences: the window really masks
            tie_word_embeddings=False,
        )
    elif family == "qwen2":
        cfg = Qwen2Config(
            **common,
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
        )
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=336,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            initializer_range=0.05,
            tie_word_embeddings=True,
        )
    else:
        raise ValueError(family)
    for key, value in over.items():
        setattr(cfg, key, value)
    return cfg


def save_tiny_model(
    family: str, directory: Path, dtype: torch.dtype = torch.float32, tokenizer: bool = False, seed: int = 0
) -> Any:
    """Save a random tiny `family` model (and optionally the tiny tokenizer) to `directory`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up between tensors shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    model.save_pretrained(directory)
    if tokenizer:
        save_tiny_tokenizer(directory)
    return model


def save_tiny_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer trained on the bundled corpus, with BOS added and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([bundled_corpus_text()], trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


def load_hf(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def untie(model: Any) -> None:
    """Give the LM head its own copy of a tied embedding: fuyou-ray trains tied checkpoints untied."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())


def train_hf_reference(model: Any, cfg: RunConfig, steps: int) -> list[float]:
    """Train the transformers model as fuyou-ray trains: same batches, lr schedule, micro-batching,
    global-norm clipping and fused AdamW (decay on >= 2-D tensors)."""
    untie(model)
    params = list(model.parameters())
    o = cfg.optimizer
    opt = reference_adamw(params, o)
    data = TokenDataset.from_config(cfg.data, cfg.model.vocab_size)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(o, step, cfg.steps)
        batch = data.batch(step, cfg.batch.global_batch, cfg.batch.seq_len)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in batch.micro_batches(cfg.batch.micro_batch):
            loss = lm_loss(model(input_ids=x).logits, y) / cfg.batch.accum_steps
            loss.backward()
            total += float(loss.detach())
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
        opt.step()
        losses.append(total)
    return losses

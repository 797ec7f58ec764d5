"""Prompt conditioning: SANA's Gemma-2 encoder, or a prompt embedding stored with the pipeline.

Deployment need not carry the 2B-parameter encoder: the pipeline keeps the embedding of its default prompt
(the null prompt unless told otherwise) as a small component, and prompts can be encoded ahead of time.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

# Words a tagger (RAM/DAPE) and SANA-SR's quality suffix produce; the tiny tokenizer is trained on them so that
# the real text path (tokenizer -> Gemma-2 -> cross-attention) runs in tests without a download.
_TINY_TOKENIZER_CORPUS = [
    "a photo of a person, face, portrait, man, woman, child, smile, hair, eye",
    "a cat, dog, bird, animal, fur, feather, grass, tree, flower, leaf, forest",
    "building, city, street, window, wall, brick, sky, cloud, mountain, water, sea, beach",
    "car, road, text, sign, food, coffee, cup, table, chair, room, astronaut, rocket, launch, smoke",
    "high quality, sharp, detailed, clean, high resolution, 8k, realistic, photograph",
    "low quality, blurry, noisy, jpeg artifacts, compressed, old photo, painting, comic, pattern, texture",
]
_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A small BPE tokenizer built locally with `tokenizers`, standing in for Gemma's (which comes from the hub)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        _TINY_TOKENIZER_CORPUS, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL_TOKENS)
    )
    # Gemma prepends <bos> to every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_text_encoder(config: dict, tokenizer) -> nn.Module:
    """A randomly initialised `Gemma2Model` with the given config, sized to `tokenizer`'s vocabulary."""
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(
        **dict(config, vocab_size=len(tokenizer) if tokenizer is not None else config["vocab_size"]),
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
    )
    return Gemma2Model(cfg)


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder: nn.Module, prompts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SANA's prompt encoding: right-padded to `max_length` tokens, last hidden state of Gemma-2.

    Returns `(embeds (B, L, C), mask (B, L))` on the encoder's device.
    """
    tokenizer.padding_side = "right"
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    embeds = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return embeds, mask


class PromptEmbedding(ModelMixin, ConfigMixin):
    """The embedding of one prompt, saved with the pipeline so that it runs without the text encoder."""

    @register_to_config
    def __init__(self, prompt: str = "", sequence_length: int = 300, embedding_dim: int = 2304):
        super().__init__()
        self.embeds = nn.Parameter(torch.zeros(1, sequence_length, embedding_dim), requires_grad=False)
        self.mask = nn.Parameter(torch.zeros(1, sequence_length), requires_grad=False)

    @classmethod
    def from_encoder(cls, tokenizer, text_encoder: nn.Module, prompt: str, max_length: int) -> "PromptEmbedding":
        embeds, mask = encode_prompts(tokenizer, text_encoder, [prompt], max_length)
        module = cls(prompt=prompt, sequence_length=embeds.shape[1], embedding_dim=embeds.shape[2])
        module.embeds.data.copy_(embeds.float().cpu())
        module.mask.data.copy_(mask.float().cpu())
        return module

    def expand(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(embeds, mask)` repeated for a batch. A placeholder that no encoder ever filled (an all-zero mask: not
        one token) is an error, never a silent zero conditioning the DiT was not trained on."""
        if not bool(self.mask.detach().any()):
            raise ValueError(
                f"the stored prompt embedding of {self.config.prompt!r} is an empty placeholder (no token in its "
                "mask): compute it with the text encoder (PromptEmbedding.from_encoder, or build_pipeline / "
                "load a pipeline that has its default_prompt/ folder)"
            )
        return self.embeds.expand(batch_size, -1, -1), self.mask.expand(batch_size, -1).long()

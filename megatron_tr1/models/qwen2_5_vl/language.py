"""The Qwen2.5 decoder: megatron-core ``GPTModel`` with M-RoPE, plus a final-hidden-states entry point.

``GPTModel`` already provides the vocab-parallel embedding (first stage), the decoder layers of this
pipeline stage, the final RMSNorm and the column-parallel LM head (last stage), tied or untied.
``final_hidden`` runs the same path as ``GPTModel.forward`` but stops before the LM head, for the RL
log-prob path that never materialises logits.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_tr1.models.qwen2_5_vl.specs import LayerSpecs


class LanguageModel(GPTModel):
    """``GPTModel`` configured for Qwen2.5-VL's text model (``position_embedding_type="mrope"``)."""

    def __init__(self, config: TransformerConfig, hf_config, specs: LayerSpecs, pre_process: bool,
                 post_process: bool):
        text = hf_config.text_config
        super().__init__(
            config=config, transformer_layer_spec=specs.language_layer, vocab_size=text.vocab_size,
            max_sequence_length=text.max_position_embeddings, pre_process=pre_process, post_process=post_process,
            parallel_output=True, share_embeddings_and_output_weights=hf_config.tie_word_embeddings,
            position_embedding_type="mrope", rotary_base=text.rope_parameters["rope_theta"])

    def final_hidden(self, decoder_input: torch.Tensor | None, position_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None, packed_seq_params=None) -> torch.Tensor:
        """Decoder output ``[s, b, h]`` of this stage (after the final norm on the last stage); packed sequences
        (``packed_seq_params``, ``b = 1``) attend within each sequence."""
        rotary = self.rotary_pos_emb(position_ids, self.mrope_section)
        return self.decoder(hidden_states=decoder_input, attention_mask=attention_mask, rotary_pos_emb=rotary,
                            packed_seq_params=packed_seq_params)

    def output_weight(self) -> torch.Tensor:
        """This rank's vocab shard of the LM head ``[vocab / tp, h]`` (the embedding when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

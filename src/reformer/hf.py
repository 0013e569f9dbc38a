"""Conversion to and from HF transformers' Reformer checkpoints: ``ReformerModelWithLMHead`` (our
:class:`~reformer.ReformerLM`), ``ReformerForMaskedLM``, ``ReformerForSequenceClassification`` and
``ReformerForQuestionAnswering`` (our heads of the same names; see ``HF_CLASSES``).

Reading needs no ``transformers``: a model object is read through its ``config`` and ``state_dict()``,
a folder through its ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin``. Writing an HF
model (``to_hf``) needs the ``[hf]`` extra.

With the same ``hash_seed`` both libraries draw the same rotations, so a converted model gives HF's
logits (to float rounding) in eval mode. Differences to know: HF chooses ``num_buckets`` itself on first
use when it is unset (and writes it into its config); an HF model without ``hash_seed`` draws new
rotations on every call, so its outputs are random in eval too; and where padding fills a whole LSH
chunk, HF's chunks look back into it while ours skip it. HF pads inputs to a multiple of the least
common multiple of its chunk lengths, so with LSH chunks shorter than local ones some lengths that are
not a multiple of that (e.g. 33 with chunks 8 and 16) give different logits; equal chunk lengths, or
lengths that are multiples, give the same. In causal mode HF combines the rounds of a token that sees
only itself (the first one) in float32 at -1e5, losing ~0.2% of its weight; we do not, which leaves
differences of ~2e-5 in the logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import ReformerConfig, read_json_object

# Our head kinds -> HF transformers class names.
HF_CLASSES = {
    "lm": "ReformerModelWithLMHead",
    "masked_lm": "ReformerForMaskedLM",
    "sequence_classification": "ReformerForSequenceClassification",
    "question_answering": "ReformerForQuestionAnswering",
}

ENWIK8_ID_OFFSET = 2  # HF's enwik8 checkpoint: byte b has id b + 2; ids 0 (padding) and 1 are specials


def encode_enwik8(text: str | bytes) -> torch.Tensor:
    """Text (UTF-8) or bytes to the ids of HF's ``google/reformer-enwik8`` (byte + 2), ``(length,)`` int64."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.tensor([b + ENWIK8_ID_OFFSET for b in data], dtype=torch.long)


def decode_enwik8(ids: torch.Tensor | list[int]) -> str:
    """Ids of the enwik8 convention back to text; ids below 2 (padding, specials) are dropped."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    data = bytes(i - ENWIK8_ID_OFFSET for i in values if ENWIK8_ID_OFFSET <= i < 256 + ENWIK8_ID_OFFSET)
    return data.decode("utf-8", errors="replace")


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def config_from_hf(hf_config: Any) -> ReformerConfig:
    """Our :class:`ReformerConfig` for an HF ``ReformerConfig`` (object or its dict)."""
    if not _get(hf_config, "axial_pos_embds", True):
        raise ValueError(
            "this HF model uses learned absolute position embeddings (axial_pos_embds=False); "
            "only axial position embeddings are supported"
        )
    attn_layers = tuple(_get(hf_config, "attn_layers"))
    num_buckets = _get(hf_config, "num_buckets")
    if isinstance(num_buckets, list):
        num_buckets = tuple(num_buckets)
    lsh_dropout = _get(hf_config, "lsh_attention_probs_dropout_prob", 0.0)
    local_dropout = _get(hf_config, "local_attention_probs_dropout_prob", lsh_dropout)
    return ReformerConfig(
        vocab_size=_get(hf_config, "vocab_size"),
        d_model=_get(hf_config, "hidden_size"),
        n_heads=_get(hf_config, "num_attention_heads"),
        d_head=_get(hf_config, "attention_head_size"),
        n_layers=len(attn_layers),
        d_ff=_get(hf_config, "feed_forward_size"),
        attn_layers=attn_layers,
        causal=bool(_get(hf_config, "is_decoder", False)),
        max_seq_len=_get(hf_config, "max_position_embeddings"),
        bucket_size=_get(hf_config, "lsh_attn_chunk_length"),
        n_buckets=num_buckets,
        n_hashes=_get(hf_config, "num_hashes"),
        lsh_chunks_before=_get(hf_config, "lsh_num_chunks_before", 1),
        lsh_chunks_after=_get(hf_config, "lsh_num_chunks_after", 0),
        lsh_key_rule="chunks",
        hash_seed=_get(hf_config, "hash_seed"),
        local_chunk_size=_get(hf_config, "local_attn_chunk_length"),
        local_chunks_before=_get(hf_config, "local_num_chunks_before", 1),
        local_chunks_after=_get(hf_config, "local_num_chunks_after", 0),
        axial_pos_shape=tuple(_get(hf_config, "axial_pos_shape")),
        axial_pos_dims=tuple(_get(hf_config, "axial_pos_embds_dim")),
        dropout=_get(hf_config, "hidden_dropout_prob", 0.0),
        attn_dropout=lsh_dropout,
        local_attn_dropout=None if local_dropout == lsh_dropout else local_dropout,
        activation=_get(hf_config, "hidden_act", "relu"),
        layer_norm_eps=_get(hf_config, "layer_norm_eps", 1e-12),
        ff_chunk_size=_get(hf_config, "chunk_size_feed_forward", 0) or None,
        initializer_range=_get(hf_config, "initializer_range", 0.02),
    )


def config_to_hf_dict(config: ReformerConfig) -> dict[str, Any]:
    """The keyword arguments of an HF ``ReformerConfig`` equivalent to ``config``."""
    if "full" in config.attn_layers:
        raise ValueError(
            "HF's Reformer has no full-attention layer; attn_layers may only hold 'lsh' and 'local'"
        )
    if config.lsh_key_rule != "chunks" and "lsh" in config.attn_layers:
        raise ValueError(
            f"HF's Reformer has only the 'chunks' LSH rule; lsh_key_rule={config.lsh_key_rule!r} cannot be "
            "converted (train with lsh_key_rule='chunks' to export)"
        )
    if config.position_embedding != "axial":
        raise ValueError(
            f"HF's Reformer has only axial position embeddings; position_embedding="
            f"{config.position_embedding!r} cannot be converted (train with position_embedding='axial')"
        )
    if config.token_shift:
        raise ValueError(
            "HF's Reformer has no token shift; a model with token_shift=True cannot be converted"
        )
    n_buckets = config.n_buckets
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_attention_heads=config.n_heads,
        attention_head_size=config.d_head, attn_layers=list(config.attn_layers),
        feed_forward_size=config.d_ff, is_decoder=config.causal, max_position_embeddings=config.max_seq_len,
        lsh_attn_chunk_length=config.bucket_size,
        num_buckets=list(n_buckets) if isinstance(n_buckets, tuple) else n_buckets,
        num_hashes=config.n_hashes, lsh_num_chunks_before=config.lsh_chunks_before,
        lsh_num_chunks_after=config.lsh_chunks_after, hash_seed=config.hash_seed,
        local_attn_chunk_length=config.local_chunk_size, local_num_chunks_before=config.local_chunks_before,
        local_num_chunks_after=config.local_chunks_after, axial_pos_embds=True,
        axial_pos_shape=list(config.axial_pos_shape), axial_pos_embds_dim=list(config.axial_pos_dims),
        hidden_dropout_prob=config.dropout, lsh_attention_probs_dropout_prob=config.attn_dropout,
        local_attention_probs_dropout_prob=config.local_dropout(),
        hidden_act=config.activation, layer_norm_eps=config.layer_norm_eps,
        chunk_size_feed_forward=config.ff_chunk_size or 0, initializer_range=config.initializer_range,
        tie_word_embeddings=False,
    )  # fmt: skip


# Parameter names: ours -> HF's, per layer kind ({i} is the layer index).
_LAYER_NAMES = {
    "attn_norm.weight": "attention.layer_norm.weight",
    "attn_norm.bias": "attention.layer_norm.bias",
    "attention.to_v.weight": "attention.self_attention.value.weight",
    "attention.to_out.weight": "attention.output.dense.weight",
    "feed_forward.norm.weight": "feed_forward.layer_norm.weight",
    "feed_forward.norm.bias": "feed_forward.layer_norm.bias",
    "feed_forward.dense_in.weight": "feed_forward.dense.dense.weight",
    "feed_forward.dense_in.bias": "feed_forward.dense.dense.bias",
    "feed_forward.dense_out.weight": "feed_forward.output.dense.weight",
    "feed_forward.dense_out.bias": "feed_forward.output.dense.bias",
}
_KIND_NAMES = {
    "lsh": {"attention.to_qk.weight": "attention.self_attention.query_key.weight"},
    "local": {
        "attention.to_q.weight": "attention.self_attention.query.weight",
        "attention.to_k.weight": "attention.self_attention.key.weight",
    },
}


def _head_names(head_kind: str) -> dict[str, str]:
    if head_kind in ("lm", "masked_lm"):
        return {"lm_head.weight": "lm_head.decoder.weight", "lm_head.bias": "lm_head.bias"}
    if head_kind == "sequence_classification":
        names = [f"classifier.{layer}.{p}" for layer in ("dense", "out_proj") for p in ("weight", "bias")]
        return {name: name for name in names}
    if head_kind == "question_answering":
        return {"qa_outputs.weight": "qa_outputs.weight", "qa_outputs.bias": "qa_outputs.bias"}
    raise ValueError(
        f"HF transformers has no Reformer model for our {head_kind!r}; convertible: {sorted(HF_CLASSES)}"
    )


def name_map(config: ReformerConfig, head_kind: str = "lm") -> dict[str, str]:
    """Our parameter names -> HF parameter names, for the model of ``head_kind`` (``HF_CLASSES``)."""
    names = {"embeddings.tokens.weight": "reformer.embeddings.word_embeddings.weight"}
    for axis in range(len(config.axial_pos_shape)):
        names[f"embeddings.positions.weights.{axis}"] = (
            f"reformer.embeddings.position_embeddings.weights.{axis}"
        )
    for i, kind in enumerate(config.attn_layers):
        for ours, theirs in {**_LAYER_NAMES, **_KIND_NAMES[kind]}.items():
            names[f"layers.blocks.{i}.{ours}"] = f"reformer.encoder.layers.{i}.{theirs}"
    names.update(
        {
            "final_norm.weight": "reformer.encoder.layer_norm.weight",
            "final_norm.bias": "reformer.encoder.layer_norm.bias",
        }
    )
    names.update(_head_names(head_kind))
    return names


def state_dict_from_hf(
    config: ReformerConfig, hf_state: dict[str, torch.Tensor], head_kind: str = "lm"
) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs in name_map(config, head_kind).items():
        if theirs not in hf_state and theirs == "lm_head.bias":
            theirs = "lm_head.decoder.bias"
        if theirs not in hf_state:
            raise ValueError(
                f"the HF checkpoint has no {theirs!r} (needed for {ours!r}); is it a {HF_CLASSES[head_kind]}?"
            )
        out[ours] = hf_state[theirs].detach().clone()
    return out


def _read_hf_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    hf_config = read_json_object(folder / "config.json", "give an HF model folder (config.json + weights)")
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            return hf_config, load_file(str(folder / "model.safetensors"))
        except Exception as err:  # safetensors raises its own error type for corrupt files
            raise ValueError(
                f"{folder / 'model.safetensors'} is not a readable safetensors file ({err})"
            ) from err
    if (folder / "pytorch_model.bin").is_file():
        try:
            return hf_config, torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{folder / 'pytorch_model.bin'} could not be read ({err})") from err
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def head_settings_from_hf(hf_config: Any, head_kind: str) -> dict[str, Any]:
    """The keyword arguments of our head class for an HF config."""
    if head_kind == "sequence_classification":
        n_labels = _get(hf_config, "num_labels", 2)
        problem_type = _get(hf_config, "problem_type")
        if problem_type is None:  # HF decides on first use; this is its rule for its default int labels
            problem_type = "regression" if n_labels == 1 else "single_label_classification"
        dropout = _get(hf_config, "classifier_dropout")
        return {"n_labels": n_labels, "problem_type": problem_type, "classifier_dropout": dropout}
    if head_kind == "question_answering" and _get(hf_config, "num_labels", 2) != 2:
        raise ValueError(
            f"this HF ReformerForQuestionAnswering has num_labels={_get(hf_config, 'num_labels')}; "
            "extractive QA needs 2 (start and end)"
        )
    return {}


def head_settings_to_hf(model: Any) -> dict[str, Any]:
    """The HF config entries of ``model``'s head settings."""
    if model.head_kind == "sequence_classification":
        if model.pooling != "first":
            raise ValueError(
                f"HF's ReformerForSequenceClassification reads the first token; this model has "
                f"pooling={model.pooling!r}, which it cannot express: train with pooling='first' to convert"
            )
        return dict(
            num_labels=model.n_labels, problem_type=model.problem_type,
            classifier_dropout=model.classifier_dropout,
        )  # fmt: skip
    if model.head_kind == "question_answering":
        return dict(num_labels=2)
    return {}


def from_hf(model_or_dir: Any, model_class: type):
    """A ``model_class`` (e.g. :class:`~reformer.ReformerLM`; ``model_class.from_hf`` calls this) with the
    config and weights of the matching HF model (``HF_CLASSES``): the object, or a local folder with
    ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin``."""
    head_kind = model_class.head_kind
    if head_kind not in HF_CLASSES:
        raise ValueError(
            f"{model_class.__name__} has no HF transformers counterpart; convertible: {sorted(HF_CLASSES)}"
        )
    if isinstance(model_or_dir, (str, os.PathLike)):
        folder = Path(model_or_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"HF model folder {folder} does not exist")
        hf_config, hf_state = _read_hf_folder(folder)
    elif hasattr(model_or_dir, "config") and hasattr(model_or_dir, "state_dict"):
        hf_config, hf_state = model_or_dir.config, model_or_dir.state_dict()
    else:
        raise TypeError(
            f"from_hf takes an HF {HF_CLASSES[head_kind]} or a folder path, got {type(model_or_dir).__name__}"
        )
    config = config_from_hf(hf_config)
    if model_class.bidirectional and config.causal:
        raise ValueError(
            f"the HF model has is_decoder=True (causal attention); {model_class.__name__} is bidirectional: "
            "convert an is_decoder=False model"
        )
    model = model_class(config, **head_settings_from_hf(hf_config, head_kind))
    model.load_state_dict(state_dict_from_hf(config, hf_state, head_kind))
    return model


def to_hf(model):
    """The HF transformers model matching ``model`` (``HF_CLASSES``) with its config and weights (needs
    the ``[hf]`` extra)."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "to_hf needs HF transformers: pip install 'reformer[hf]' (or pip install transformers)"
        ) from err
    hf_kwargs = config_to_hf_dict(model.config)  # refuses what HF's Reformer cannot express
    names = name_map(model.config, model.head_kind)  # refuses heads HF does not have
    hf_class = getattr(transformers, HF_CLASSES[model.head_kind])
    hf_config = transformers.ReformerConfig(**hf_kwargs, **head_settings_to_hf(model))
    hf_model = hf_class(hf_config)
    state = model.state_dict()
    hf_state = {theirs: state[ours] for ours, theirs in names.items()}
    if "lm_head.bias" in hf_state:
        hf_state["lm_head.decoder.bias"] = hf_state["lm_head.bias"]
    hf_model.load_state_dict(hf_state, strict=True)
    return hf_model.eval() if not model.training else hf_model

"""The per-sample loss of a Hugging Face model, derived from its head: the probe's default.

The probe needs one loss per sample ([B]) to name the samples behind a ``data``
verdict; a model's own ``outputs.loss`` is one number for the batch. So the model is
called with the batch minus ``labels`` and the loss is recomputed from the logits the
way ``transformers`` computes it for that head, per sample:

- causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``, ...; logits [B, T, V]): the
  logits at t predict the label at t + 1 (``shift_labels``, when the batch has them,
  are taken as they are), cross-entropy with ``-100`` ignored, the mean over each
  sample's counted tokens (a sample with none counts 0: it trained nothing);
- sequence classification (``*ForSequenceClassification``; logits [B, C]), by
  ``config.problem_type`` or, as ``transformers`` infers it: ``num_labels == 1``
  regression (squared error), integer labels single-label (cross-entropy), else
  multi-label (binary cross-entropy, the mean over the labels).

Any other head raises `UnknownHeadError` (the verdict is then ``unknown`` and says to
pass ``probe_loss``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from spikewatch_hooks.forensics.evaluate import ProbeLoss

_IGNORE = -100  # transformers' ignore index for labels


class UnknownHeadError(TypeError):
    """No per-sample loss can be derived for this model: pass ``probe_loss``."""


def head_of(model: nn.Module) -> str | None:
    """``"causal_lm"``, ``"sequence_classification"`` or None, from the model's class.

    Example:
        >>> from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model
        >>> config = GPT2Config(n_embd=8, n_layer=1, n_head=1, vocab_size=11, n_positions=4,
        ...                     bos_token_id=None, eos_token_id=None)
        >>> head_of(GPT2ForSequenceClassification(config)), head_of(GPT2Model(config))
        ('sequence_classification', None)
    """
    name = type(_unwrapped(model)).__name__
    causal, classify = _head_names()
    if name in causal or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name in classify or name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    return None


def derived_probe_loss(model: nn.Module) -> ProbeLoss:
    """The per-sample loss for ``model``'s head (`UnknownHeadError` when it has none
    the probe knows; the error reaches the verdict when the probe runs).

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> config = GPT2Config(n_embd=8, n_layer=1, n_head=1, vocab_size=11, n_positions=6,
        ...                     bos_token_id=None, eos_token_id=None)
        >>> lm = GPT2LMHeadModel(config).eval()
        >>> ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
        >>> labels = ids.clone()
        >>> labels[0, 3:] = -100  # sample 0: its first 3 tokens only (2 predictions)
        >>> derived_probe_loss(lm)(lm, {"input_ids": ids, "labels": labels}).shape
        torch.Size([3])
    """
    head = head_of(model)
    if head == "causal_lm":
        return causal_lm_loss
    if head == "sequence_classification":
        return sequence_classification_loss
    return _unknown_head


def causal_lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample ([B]), ``-100`` labels ignored."""
    inputs, labels = _split(batch, model)
    shifted = inputs.pop("shift_labels", None)
    inputs.setdefault("use_cache", False)  # no key/value cache to allocate for one pass
    logits = _logits(model(**inputs)).float()
    if shifted is None:  # the logits at t predict the label at t + 1
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = shifted
    per_token = functional.cross_entropy(
        logits.transpose(1, 2), targets.long(), ignore_index=_IGNORE, reduction="none"
    )
    counted = (targets != _IGNORE).sum(dim=1)
    return per_token.sum(dim=1) / counted.clamp(min=1)


def sequence_classification_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Each sample's loss ([B]) for a sequence-classification head (module docstring)."""
    inputs, labels = _split(batch, model)
    logits = _logits(model(**inputs)).float()
    config = getattr(_unwrapped(model), "config", None)
    problem = getattr(config, "problem_type", None)
    num_labels = int(getattr(config, "num_labels", logits.shape[-1]))
    if problem is None:  # as transformers infers it on the first forward with labels
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    rows = logits.shape[0]
    if problem == "regression":
        error = logits.reshape(rows, -1) - labels.float().reshape(rows, -1)
        return error.pow(2).mean(dim=1)
    if problem == "single_label_classification":
        return functional.cross_entropy(
            logits.reshape(rows, -1), labels.reshape(-1).long(), ignore_index=_IGNORE,
            reduction="none",
        )  # fmt: skip
    per_label = functional.binary_cross_entropy_with_logits(
        logits, labels.float(), reduction="none"
    )
    return per_label.reshape(rows, -1).mean(dim=1)


def _split(batch: Any, model: nn.Module) -> tuple[dict[str, Any], torch.Tensor]:
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise UnknownHeadError(
            f"the batch for {type(model).__name__} has no 'labels': pass probe_loss="
            "(a function (model, batch) -> per-sample losses) to SpikewatchCallback"
        )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]


def _logits(outputs: Any) -> torch.Tensor:
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise UnknownHeadError("the model returned no logits tensor: pass probe_loss=")
    return logits


def _unknown_head(model: nn.Module, batch: Any) -> torch.Tensor:
    raise UnknownHeadError(
        f"spikewatch cannot derive a per-sample loss for {type(_unwrapped(model)).__name__} "
        "(it knows causal-LM and sequence-classification heads): pass probe_loss= (a "
        "function (model, batch) -> per-sample losses) to SpikewatchCallback"
    )


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT
    (``get_base_model()``) wrappers."""
    for _ in range(4):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        base = getattr(model, "get_base_model", None)
        if callable(base) and base() is not model:
            model = base()
            continue
        break
    return model


def _head_names() -> tuple[set[str], set[str]]:
    """The class names transformers' auto classes map to these heads."""
    try:
        from transformers.models.auto import modeling_auto  # noqa: PLC0415 (lazy: heavy)
    except ImportError:  # a transformers without the mappings: names by suffix only
        return set(), set()

    def names(mapping: Mapping[str, Any]) -> set[str]:
        out: set[str] = set()
        for value in mapping.values():
            out.update([value] if isinstance(value, str) else value)
        return out

    return (
        names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        names(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    )

"""``NeuroAdaTrainer``: ``transformers.Trainer`` for a model with NeuroAda adapters (``apply``); its
checkpoint logic is ``NeuroAdaTrainerMixin``, which any ``Trainer`` subclass can take (TRL's
``SFTTrainer`` does in ``adapters/sft.py``).

Trainer itself trains an applied model as it is (only the deltas, and a head with
``apply(..., head=True)``, require grad, so its optimizer holds only those). What it cannot do
alone is checkpoint one: ``Trainer._save`` writes ``save_pretrained``'s full copy of the model
(the base, for a few MB of deltas), and ``Trainer._load_from_checkpoint`` resumes only from such
a copy (or a PEFT adapter). A callback sees neither (``on_save`` runs after the weights are
written, and nothing lets it stop that). So the mixin overrides the hooks that every
checkpoint goes through, and nothing else:

- ``_save`` (every ``save_steps`` checkpoint and ``save_model``) writes the adapter's delta
  sidecar, ``neuroada.delta.safetensors`` (``save_delta``: deltas, head, index SHA-256;
  atomically), plus the tokenizer when Trainer has one; never the base. Trainer still writes its
  own optimizer, scheduler, RNG and ``trainer_state.json`` beside it, as for any checkpoint.
- ``_load_from_checkpoint`` and ``_load_best_model`` (``resume_from_checkpoint=...``,
  ``load_best_model_at_end``) read that sidecar back into the adapter's deltas and head
  (refusing one made on another index); the optimizer state is then Trainer's own.
- ``create_optimizer`` lets Trainer build the optimizer (or take the user's), then refuses one
  that would train a parameter the sidecar does not hold (e.g. the deltas of the active adapter
  while ``adapter=`` names another): such training would be lost at the first checkpoint.

DDP (torchrun) runs through Trainer as usual, with one more override, ``_wrap_model``: before
Trainer wraps the model, the frozen parameters and the bypass's buffers (index rows, base values)
are put on DDP's ignore list (``_ddp_params_and_buffers_to_ignore``), so DDP neither broadcasts the
whole base from rank 0 when it starts nor the buffers before every forward: every rank loaded the
same base (``apply`` checked its fingerprints) and built the same buffers from it. Only the
deltas and a trained head go through DDP's reducer. FSDP and DeepSpeed are refused
(``train-sparse --fsdp`` shards a NeuroAda model).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers import Trainer

from neuroada_tools.adapters import registry as reg_mod
from neuroada_tools.adapters.api import save_delta
from neuroada_tools.errors import ModelError
from neuroada_tools.io.sidecar import read_delta
from neuroada_tools.train.bypass.config import DELTA_ATTR

DELTA_FILE = "neuroada.delta.safetensors"
_IGNORED = "_neuroada_ddp_ignored"  # the names _wrap_model put on DDP's ignore list


class NeuroAdaTrainerMixin:
    """Checkpoints as the NeuroAda delta sidecar, for any ``transformers.Trainer`` subclass.

    Put it first among the bases: ``class MyTrainer(NeuroAdaTrainerMixin, SomeTrainer)``. It takes
    one argument of its own, ``adapter`` (keyword only): the adapter to save and resume (default:
    the one active at each save); the rest go to ``SomeTrainer``. ``model`` must be a model that
    ``neuroada_tools.apply()`` adapted (not a name to load, not ``model_init``).

    >>> import neuroada_tools, torch
    >>> from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    >>> class MyTrainer(NeuroAdaTrainerMixin, Trainer):
    ...     pass
    >>> model = neuroada_tools.apply(AutoModelForCausalLM.from_pretrained("base"), "base.k4.index.safetensors")
    >>> ids = torch.randint(3, 60, (4, 12))
    >>> args = TrainingArguments("mine", max_steps=1, per_device_train_batch_size=4, report_to=[],
    ...                          disable_tqdm=True, use_cpu=True)
    >>> trainer = MyTrainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    >>> _ = trainer.train()
    {'train_runtime': ...}
    >>> trainer.save_model("mine/final")
    >>> os.listdir("mine/final")
    ['neuroada.delta.safetensors']
    """

    neuroada_adapter: str | None = None

    def __init__(self, model=None, *rest, adapter: str | None = None, **kwargs) -> None:
        who = type(self).__name__
        if not isinstance(model, nn.Module):
            raise ModelError(f"{who}: pass the model that neuroada_tools.apply() adapted (got "
                             f"{type(model).__name__}; loading by name and model_init are not supported)")
        reg = reg_mod.require(reg_mod.unwrap(model))
        if adapter is not None:
            reg_mod.get(reg, adapter)
        self.neuroada_adapter = adapter
        super().__init__(model, *rest, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ModelError(f"{who}: FSDP and DeepSpeed are not supported; use DDP, or "
                             "neuroada-tools train-sparse --fsdp")

    def create_optimizer(self, *args, **kwargs):
        """Trainer's optimizer, refused if it trains a parameter that the delta sidecar does not hold."""
        optimizer = super().create_optimizer(*args, **kwargs)
        model = reg_mod.unwrap(self.model)
        reg = reg_mod.require(model)
        name = self.neuroada_adapter if self.neuroada_adapter is not None else reg.active
        adapter = reg.adapters.get(name) if name is not None else None
        saved = set()
        if adapter is not None:
            saved = {id(p) for p in adapter.params.values()}
            if reg.active == adapter.name:  # its head and anything unfrozen by hand: save_delta writes them
                saved |= {id(p) for n, p in model.named_parameters()
                          if p.requires_grad and not n.endswith("." + DELTA_ATTR)}
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in saved:
                    what = names.get(id(p), "a parameter")
                    raise ModelError(f"{type(self).__name__}: the optimizer trains {what!r}, "
                                     f"which the delta sidecar of adapter {name!r} does not hold; "
                                     "set_active() the adapter to train")
        return optimizer

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        """Put the frozen base and the bypass buffers on DDP's ignore list, then wrap as Trainer does."""
        inner = reg_mod.unwrap(model)
        if training and inner is model:
            frozen = [n for n, p in inner.named_parameters() if not p.requires_grad]
            buffers = [n for n, _ in inner.named_buffers() if n.rsplit(".", 1)[-1].startswith("neuroada_")]
            ours = {*frozen, *buffers}  # recomputed each time: the active adapter may have changed since
            users = set(getattr(inner, "_ddp_params_and_buffers_to_ignore", ())) - inner.__dict__.get(_IGNORED, set())
            inner._ddp_params_and_buffers_to_ignore = sorted(users | ours)
            object.__setattr__(inner, _IGNORED, ours)
        return super()._wrap_model(model, training, dataloader)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter's delta sidecar (and the tokenizer) to ``output_dir``; rank 0 only."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_delta(self.model, Path(output_dir) / DELTA_FILE, name=self.neuroada_adapter)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Read ``resume_from_checkpoint/neuroada.delta.safetensors`` into the adapter."""
        load_checkpoint_delta(model if model is not None else self.model, resume_from_checkpoint,
                              self.neuroada_adapter)

    def _load_best_model(self) -> None:
        load_checkpoint_delta(self.model, self.state.best_model_checkpoint, self.neuroada_adapter)


class NeuroAdaTrainer(NeuroAdaTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints are the NeuroAda delta sidecar, not the model.

    ``adapter``: the adapter to save and resume (default: the one active at each save). Every
    other argument is Trainer's.

    >>> import neuroada_tools, torch
    >>> from transformers import AutoModelForCausalLM, TrainingArguments
    >>> model = AutoModelForCausalLM.from_pretrained("base")
    >>> model = neuroada_tools.apply(model, "base.k4.index.safetensors")
    >>> ids = torch.randint(3, 60, (8, 12))
    >>> data = [{"input_ids": r, "labels": r} for r in ids]
    >>> args = TrainingArguments("out", max_steps=2, save_steps=2, per_device_train_batch_size=4,
    ...                          learning_rate=1e-2, report_to=[], disable_tqdm=True, use_cpu=True)
    >>> _ = neuroada_tools.NeuroAdaTrainer(model=model, args=args, train_dataset=data).train()
    {'train_runtime': ...}
    >>> sorted(os.listdir("out/checkpoint-2"))  # no model.safetensors
    ['neuroada.delta.safetensors', 'optimizer.pt', 'rng_state.pth', 'scheduler.pt', 'trainer_state.json']
    """


def load_checkpoint_delta(model, folder: str | Path, name: str | None = None) -> None:
    """Load ``folder/neuroada.delta.safetensors`` into adapter ``name`` (default: the active one).

    ``ModelError`` for a folder without it (not a ``NeuroAdaTrainer`` checkpoint); ``SidecarError``
    naming the tensor for one made on another index or with other shapes.

    >>> import neuroada_tools, torch
    >>> from transformers import AutoModelForCausalLM
    >>> index = "base.k4.index.safetensors"
    >>> trained = neuroada_tools.apply(AutoModelForCausalLM.from_pretrained("base"), index, "a.delta.safetensors")
    >>> os.makedirs("ckpt", exist_ok=True)
    >>> _ = neuroada_tools.save_delta(trained, "ckpt/neuroada.delta.safetensors")
    >>> fresh = neuroada_tools.apply(AutoModelForCausalLM.from_pretrained("base"), index)  # zeros
    >>> load_checkpoint_delta(fresh, "ckpt")
    >>> ids = torch.tensor([[1, 5, 9, 4]])
    >>> with torch.no_grad():
    ...     torch.equal(fresh(ids).logits, trained(ids).logits)
    True
    """
    model = reg_mod.unwrap(model)
    reg = reg_mod.require(model)
    path = Path(folder) / DELTA_FILE
    if not path.is_file():
        raise ModelError(f"{folder}: no {DELTA_FILE} (not a checkpoint of NeuroAdaTrainer)")
    if name is None:
        if reg.active is None:
            raise ModelError(f"{path}: no adapter is active to load it into (adapters: {reg.names()})")
        name = reg.active
    adapter = reg_mod.get(reg, name)
    reg_mod.load_values(model, reg, adapter, read_delta(path), path.name)

"""Upstream dictionary_learning's trainer API over this package's trainers, one mixin for all of
them: `loss(x, step, logging=False)` (the loss, or with `logging` a `LossLog(x, x_hat, f, losses)`,
changing no training state), `get_auxiliary_loss` on TopK-style trainers, `num_tokens_since_fired`,
and each hyperparameter as an attribute of the trainer (upstream's trainers store every argument so:
`trainer.l1_penalty`, `trainer.k`, ...), read from and written to its config."""

from __future__ import annotations

import dataclasses
import inspect
from collections import namedtuple
from typing import Any, ClassVar

import torch

from .signatures import KEYWORD, POSITIONAL, flat_signature

# what upstream's `trainer.loss(x, step=..., logging=True)` returns
LossLog = namedtuple("LossLog", ["x", "x_hat", "f", "losses"])


class UpstreamTrainerAPI:
    """Upstream's names on a `trainers.base.Trainer` (mixed in just before it). Upstream's
    constructor: the config's fields in `positions` (upstream's order) positionally, the rest by
    keyword; each method's `__init__` shows that signature (introspection and upstream's calls see
    the method's own parameters)."""

    positions: ClassVar[tuple[str, ...]] = ()
    loss_log_type = LossLog  # JumpReluTrainer's upstream names its fields (x, recon, f, losses)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)

        def __init__(self: Any, *args: Any, config: Any = None, **fields: Any) -> None:
            if len(args) > len(cls.positions):
                raise TypeError(f"{cls.__name__} takes at most {len(cls.positions)} positional "
                                f"arguments ({', '.join(cls.positions)}), got {len(args)}")
            twice = sorted(set(cls.positions[:len(args)]) & set(fields))
            if twice:
                raise TypeError(f"{cls.__name__} got multiple values for {twice}")
            super(UpstreamTrainerAPI, self).__init__(config, **dict(zip(cls.positions, args)),
                                                     **fields)

        __init__.__signature__ = cls.signature()  # type: ignore[attr-defined]
        __init__.__qualname__ = f"{cls.__name__}.__init__"
        cls.__init__ = __init__  # type: ignore[method-assign]

    @classmethod
    def signature(cls) -> inspect.Signature:
        fields = {field.name: field for field in dataclasses.fields(cls.Config)}
        defaults = {}  # (dict_class None in the config means the method's own class)
        if fields["dict_class"].default is None and cls.default_dict_class is not None:
            defaults["dict_class"] = cls.default_dict_class
        rest = sorted((name for name in fields if name not in cls.positions),  # required first
                      key=lambda name: fields[name].default is not dataclasses.MISSING)
        return flat_signature(fields, cls.positions, rest, defaults=defaults,
                              leading=[inspect.Parameter("self", POSITIONAL)],
                              trailing=[inspect.Parameter("config", KEYWORD, default=None)])

    # only for names the trainer itself lacks: its config's values
    def __getattr__(self, name: str) -> Any:
        cfg = self.__dict__.get("cfg")
        if cfg is not None and name in type(cfg).__dataclass_fields__:
            return getattr(cfg, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # `trainer.k_aux = ...` sets the config's value
    def __setattr__(self, name: str, value: Any) -> None:
        cfg = self.__dict__.get("cfg")
        # (the trainer's device is its own: the resolved torch.device)
        if (cfg is not None and name in type(cfg).__dataclass_fields__
                and name not in self.__dict__ and name != "device"):
            setattr(cfg, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def num_tokens_since_fired(self) -> torch.Tensor:
        return self.dead.counts

    @property
    def steps_since_active(self) -> torch.Tensor | None:
        """Per latent, the consecutive steps it fired on no token (kept only with
        resample_steps)."""
        return None if self.resampling is None else self.resampling.steps_since_active

    def dead_mask(self, threshold_tokens: int) -> torch.Tensor:
        return self.dead.mask(threshold_tokens)

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False,
             y: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Upstream's `loss(x, step, logging=False)` (a transcoder's target as `y`): the training
        loss of a batch, or with `logging` upstream's LossLog; no training state changes either
        way."""
        if isinstance(step, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.loss(x, step=None, logging=False, y=None): got "
                            "a tensor where the step goes; pass a transcoder's target as y=")
        y = x if y is None else y
        out = self.step_loss(x, y, int(step or 0))
        if not logging:
            return out.loss
        return self.loss_log_type(x, out.y_hat.detach(), self.dense_codes(x, out),
                                  self.logged_losses(y, out))

    @torch.no_grad()
    def dense_codes(self, x: torch.Tensor, out: Any) -> torch.Tensor:
        """The step's codes `[batch, d_sae]`."""
        code = out.state.get("code")
        if code is None:
            return self.ae.encode(x)
        return code.detach() if isinstance(code, torch.Tensor) else code.to_dense(self.ae.dict_size)

    def logged_losses(self, y: torch.Tensor, out: Any) -> dict[str, Any]:
        error = (y - out.y_hat.detach())
        return {"l2_loss": error.norm(dim=-1).mean().item(),
                "mse_loss": error.pow(2).sum(dim=-1).mean().item(), "loss": out.loss.item(),
                **out.metrics}


class UpdateX:
    """Upstream names `update`'s batch `x` in its TopK-style, gated (GDM) and JumpReLU trainers
    (mixed in first)."""

    def update(self, step: int, x: Any, extra_loss: Any = None) -> float:
        return super().update(step, x, extra_loss)

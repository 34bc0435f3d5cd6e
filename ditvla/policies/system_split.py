"""Each of the runtime's two processes keeps only the part of a policy it runs.

``ditvla serve`` runs System 2 (the VLM: frames and words to tokens,
:meth:`DiTVLAPolicy.vlm_tokens`) in a process of its own, and System 1 (the action head:
tokens to a context, :meth:`DiTVLAPolicy.context_from`, then chunks, ``act``) in the
server's loop. Each loads the policy folder; whole, each would hold every weight, and the
VLM, the bulk of any real policy, would sit twice on one device. :func:`keep_only` releases
what the other system runs: System 1 keeps the action head, the auxiliary head and the
normalizer; System 2 keeps the VLM. The foresight heads (trained jointly, never run when
acting) leave both. A released part answers any use with an error that names it.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from ditvla.contract import PolicyInputError
from ditvla.policies.quantization import module_bytes

System = Literal["system1", "system2"]
# the modules of a DiTVLAPolicy each system runs; the others are released
KEPT_PARTS: dict[str, tuple[str, ...]] = {
    "system1": ("head", "auxiliary"),
    "system2": ("backbone",),
}
RELEASABLE_PARTS = ("backbone", "head", "auxiliary", "foresight")


class ReleasedPart(nn.Module):
    """Where a released module was: no weights; calling it or reading from it raises."""

    def __init__(self, part: str, system: str):
        super().__init__()
        self.message = (
            f"this copy of the policy serves {system} only: its {part} was released "
            "(ditvla.policies.system_split.keep_only); load the policy folder again for "
            "the whole policy"
        )

    def forward(self, *_: Any, **__: Any) -> Any:
        raise PolicyInputError(self.message)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            raise PolicyInputError(self.message) from None


def keep_only(policy: nn.Module, system: System) -> dict[str, int]:
    """Release every part of ``policy`` that ``system`` does not run (in place); the bytes
    of weights and buffers kept and released."""
    if system not in KEPT_PARTS:
        raise PolicyInputError(f"system {system!r} is not one of {', '.join(KEPT_PARTS)}")
    released = 0
    for part in RELEASABLE_PARTS:
        module = getattr(policy, part, None)
        if part in KEPT_PARTS[system] or not isinstance(module, nn.Module):
            continue
        released += weight_bytes(module)
        setattr(policy, part, ReleasedPart(part, system))
    return {"kept": weight_bytes(policy), "released": released}


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s weights and buffers, quantized ones at their stored size
    (:func:`~ditvla.policies.quantization.module_bytes` of each submodule)."""
    return sum(module_bytes(part) for part in module.modules())

"""Output of third-party libraries that aapo cannot fix at its source, kept off a run's console.

Everything aapo itself calls uses the current APIs; what is handled here is emitted from inside a
library on a path aapo does not control. Each entry names the library, the call that emits it and
why it cannot be fixed from aapo. ``tests/test_warnings.py`` runs the first ``aapo train`` and
checks that its output carries no warning.
"""

from __future__ import annotations

import warnings

# (message regex, category, module regex, who emits it and why aapo cannot avoid it)
IGNORED_WARNINGS = (
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. "
     r"Please use `torch\.distributed\.all_gather_single` instead\.$",
     FutureWarning, r"torch\.distributed\.c10d_logger",
     "DeepSpeed (0.19) ZeRO-3: deepspeed.comm.torch.TorchBackend picks torch.distributed.all_gather_into_tensor "
     "(torch 2.13 renamed it all_gather_single) to gather partitioned parameters; aapo never calls it"),
    (r"`torch\.distributed\.reduce_scatter_tensor` is deprecated\. "
     r"Please use `torch\.distributed\.reduce_scatter_single` instead\.$",
     FutureWarning, r"torch\.distributed\.c10d_logger",
     "DeepSpeed (0.19) ZeRO-3: deepspeed.comm.torch.TorchBackend picks torch.distributed.reduce_scatter_tensor "
     "(torch 2.13 renamed it reduce_scatter_single) to reduce-scatter gradients; aapo never calls it"),
    (r"`is_gradient_checkpointing` is deprecated",
     FutureWarning, r"transformers\.modeling_utils",
     "peft (0.21) PeftModel.__init__ reads model.is_gradient_checkpointing (deprecated in transformers 5) when "
     "aapo export / aapo eval --run build the base model with its LoRA adapter; aapo never reads it"),
)


def ignore_third_party_warnings() -> None:
    """Install :data:`IGNORED_WARNINGS` as ``ignore`` filters (idempotent: ``filterwarnings`` does not
    add a filter twice). Each filter matches one message from one module and category only, so the
    same deprecation raised by any other caller (aapo's own code included) still shows. Torch
    attributes these warnings to its ``c10d_logger`` wrapper, not to DeepSpeed's frame, so the
    module regex cannot name DeepSpeed; aapo_app calls none of these collectives (it uses
    all_reduce, broadcast_object_list, all_gather_object, gather_object and barrier)."""
    for message, category, module, _why in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)

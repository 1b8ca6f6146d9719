"""Task facts: what the compressed model will see at inference, which decides what can go.

The same network is removable, foldable or essential depending on the task: a text encoder is
dead weight when the prompt is dropped, a constant when the prompt is fixed, and part of the
model when the prompt changes per image. The analyser reads these facts instead of hard-coding
AdcSR's choices, so it applies to any family's pipeline or a plain SD UNet alike (each family states
its facts: :meth:`compress.families.ModelFamily.facts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import AdcError

PROMPT_POLICIES = ("variable", "fixed", "dropped")

# Label kinds: every traced tensor carries the set of labels (named sources) it depends on.
VARIABLE, CONSTANT, DROPPED = "variable", "constant", "dropped"
PROMPT = "prompt"


@dataclass(frozen=True)
class TaskFacts:
    """What is variable, constant or dropped in the task the compressed model serves.

    variable: pipeline inputs (keyword names of ``bundle.forward``) that change per image.
    constant: inputs or settings fixed for the task (``timestep=999``). Tensors passed under
        these names are labelled constant; settings held by the bundle itself (a pipeline's
        ``self.timestep``) need no entry, since tensors built from Python numbers carry no
        label and count as constant anyway. Values are shown in the report.
    prompt: ``variable`` (a prompt per image: keep its path), ``fixed`` (one prompt for every
        image: its path is a constant, fold it) or ``dropped`` (no prompt: remove its path).
    prompt_inputs: pipeline inputs that carry the prompt (e.g. ``prompt_embeds``).
    prompt_sources: modules whose *output* is the prompt (a tagger that writes it). With a fixed
        or dropped prompt they are removable: the prompt no longer comes from them.
    prompt_encoders: modules whose *input* is the prompt (the text encoder). Their inputs are
        labelled as the prompt, because the step before them (tags -> tokenizer -> ids) is not
        a tensor operation and would otherwise hide the dependency.
    edges: explicit (source module, destination module) dataflow edges for other non-tensor
        steps: the destination's tensor inputs get the source's output labels.
    prune_scopes: modules to build torch-pruning graphs on; ``None`` chooses automatically
        (every live network on the image path that is neither removed nor constant).
    """

    variable: tuple[str, ...] = ("lr",)
    constant: dict[str, Any] = field(default_factory=lambda: {"timestep": 999})
    prompt: str = "dropped"
    prompt_inputs: tuple[str, ...] = ("prompt_embeds", "encoder_hidden_states")
    prompt_sources: tuple[str, ...] = ()
    prompt_encoders: tuple[str, ...] = ("text_encoder",)
    edges: tuple[tuple[str, str], ...] = ()
    prune_scopes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_POLICIES:
            raise AdcError(f"prompt policy {self.prompt!r} is not one of {', '.join(PROMPT_POLICIES)}")
        for name in ("variable", "prompt_inputs", "prompt_sources", "prompt_encoders"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise AdcError(f"TaskFacts.{name} = {value!r}, expected a tuple of names")
        if not isinstance(self.constant, dict):
            raise AdcError(f"TaskFacts.constant = {self.constant!r}, expected a dict of name -> value")
        for e in self.edges:
            if not (isinstance(e, tuple) and len(e) == 2 and all(isinstance(v, str) for v in e)):
                raise AdcError(f"TaskFacts.edges entry {e!r} is not a (source, destination) pair of module names")
        if overlap := set(self.variable) & (set(self.constant) | set(self.prompt_inputs)):
            raise AdcError(f"TaskFacts: {sorted(overlap)} declared both variable and constant/prompt")

    def with_prompt(self, prompt: str) -> "TaskFacts":
        return replace(self, prompt=prompt)

    def kind_of(self, label: str) -> str:
        """The kind (variable / constant / dropped) of a tensor label."""
        if label == PROMPT:
            return {"variable": VARIABLE, "fixed": CONSTANT, "dropped": DROPPED}[self.prompt]
        if label in self.variable:
            return VARIABLE
        return CONSTANT

    def describe(self) -> str:
        const = ", ".join(f"{k}={v}" for k, v in self.constant.items()) or "none"
        return (f"variable inputs: {', '.join(self.variable)}; constants: {const}; prompt: {self.prompt} "
                f"(prompt inputs {', '.join(self.prompt_inputs) or '-'}, sources {', '.join(self.prompt_sources) or '-'}, "
                f"encoders {', '.join(self.prompt_encoders) or '-'})")


def unet_facts(prompt: str = "dropped") -> TaskFacts:
    """A bare ``UNet2DConditionModel`` called as ``unet(sample, timestep, encoder_hidden_states)``."""
    return TaskFacts(variable=("sample",), constant={"timestep": 999}, prompt=prompt,
                     prompt_inputs=("encoder_hidden_states",), prompt_sources=(), prompt_encoders=(), edges=())

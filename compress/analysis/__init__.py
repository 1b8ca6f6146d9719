"""What a compressed model can drop, fold, prune or must keep, read from the pipeline's dataflow.

``analyse(bundle, facts, example_inputs)`` traces one forward call of a pipeline (an
``nn.Module`` whose components are its children, or listed by ``components()``), labels every
tensor with the pipeline inputs it depends on, and classifies every module as

* **removable**: only serves conditioning the task drops, or only re-encodes the input;
* **foldable**: depends only on constants (a fixed timestep, a fixed prompt): compute once;
* **prunable**: channels in torch-pruning dependency groups (UNet, VAE decoder);
* **keep**: interfaces whose shapes the pipeline fixes, and live modules outside the pruning scopes;

each with a human-readable reason. ``write_report`` writes Markdown + CSV;
``python -m compress.analysis`` does both for a family's model. The result carries its
:class:`Plan`, which ``remove``/``fold``/``prune`` consume.
"""

from .core import CLASSES, Analysis, Row, SingleComponent, analyse
from .facts import TaskFacts, unet_facts
from .plan import Decision, Plan, ScopePlan
from .groups import CoupledLayer, PrunableGroup
from .report import render_markdown, write_report

__all__ = [
    "CLASSES", "Analysis", "Row", "SingleComponent", "analyse", "TaskFacts", "unet_facts", "Plan", "Decision",
    "ScopePlan", "CoupledLayer", "PrunableGroup", "render_markdown", "write_report",
]

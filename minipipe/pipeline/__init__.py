"""The GPipe core that runs a step: the engine executes a schedule's actions on this rank's stage
(stage), moving values with comm, re-materialising with recompute, keeping BatchNorm's pipeline
half (running_stats) and the tied embedding (tied), then one synchronous update (optim).
Evaluation and generation are its forward-only uses; spans and warm-up time and prime it. These
modules import no model code: layers reach them only through the layer contract."""

"""Image classification on a dual encoder: the classifier module, the linear probe, WiSE-FT.

The task itself (what the training loop calls) is `mmtune.tasks.classify`; the comparison of
methods (`mmtune classify`) is `mmtune.classify.compare`.
"""

METHODS = ("zeroshot", "linear-probe", "finetune", "lora", "lp-ft", "flyp", "wise-ft")
TRAINED = ("finetune", "lora", "lp-ft", "flyp")  # through the training loop

"""Training a cooked model: the loop (`loop`), FSDP2 setup (`distributed`), DCP checkpoints
(`checkpoints`), distillation losses (`losses`) and text data (`textdata`)."""
